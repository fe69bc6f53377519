"""Every number of docs/gradual.md ("Does gradual beat one cut?"), recomputed from the committed per-problem
results that scripts/gradual.py writes (RESULTS/<cell>.json: each held-out problem's correctness and gold
log-probability, for every model).

    python scripts/gradual_stats.py                     # results/gradual: prints the tables, writes table.md and
                                                        # the curves (dense_curve.png, budget_curve.png) beside them
    python scripts/gradual_stats.py --results results/gradual-step8 --pool results/gradual-step8-amd
                                                        # and the comparisons over both, in the first's pooled.md

Statistics (fixed with the design, before the comparisons ran; the seed-level ones since issue 23):
1. Per method, size and budget: accuracy and mean gold log-probability, mean +- s.d. over seeds; retention =
   accuracy / the dense model's accuracy on the same problems.
2. A - B (e.g. PTL - Prune-Once), paired: d[s, i] = x_A[s, i] - x_B[s, i] for problem i under seed s (the two
   methods of one seed share calibration sample and recovery texts). The seed (a training run) is the unit of
   replication: the headline is the mean of the per-seed means d_s with a t-interval over seeds,
   mean(d_s) +- t(0.975, S - 1) sd(d_s) / sqrt(S), beside a hierarchical bootstrap (seeds resampled, then
   problems within each resampled seed) and an exact sign test over seeds. The problem-level interval of one
   seed (a paired bootstrap over its problems) is shown only as within-seed precision.
3. McNemar's exact test per seed (b = A right and B wrong, c = the reverse), never pooled over seeds: pooled,
   it would count S x n pairs as independent when the seeds disagree among themselves.
4. --pool (issue 23, step 8(e) of scripts/gradual.py): results of the same design from other dense models. Each
   directory's tables as in 1-3, then the comparisons of 2 over the training runs of all of them, a unit being
   (dense model, seed); the paired differences never cross directories.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptl_common import check_ranges, flag, human, run_cli  # noqa: E402

LABEL = {"ptl": "PTL", "ptlc": "PTL, one schedule", "sel": "PTL's units, one cut",
         "nor": "PTL's rounds unrecovered, one recovery", "once": "Prune-Once",
         "taylor": "Prune-Once, LLM-Pruner criterion", "slicegpt": "SliceGPT", "shortgpt": "ShortGPT"}
# (A, B) pairs reported as A - B: each gradual schedule against one cut, then the steps of the decomposition
# (issue 23): once -> sel changes only the units; sel -> ptlc only when they are cut (training interleaved, the
# same data, lr schedule and optimizer); ptlc -> ptl only the per-round restarts of the schedule.
PAIRS = [("ptl", "once"), ("ptlc", "once"), ("ptl", "ptlc"), ("ptlc", "sel"), ("sel", "once"), ("nor", "once"),
         ("ptl", "taylor"), ("ptl", "slicegpt"), ("ptl", "shortgpt")]


@dataclass
class Config:
    """The tables and curves of the gradual-vs-once experiment, from its per-problem results."""
    results: str = flag("results/gradual", "the directory gradual.py wrote")
    pool: str = flag("", "further result directories (comma-separated) of the same design on other dense models: "
                         "their seeds join the comparisons as further units")
    reps: int = flag(10000, "bootstrap resamples")

    def __post_init__(self):
        check_ranges(self, positive=("reps",))
        for d in [self.results, *self.pool_list()]:
            if not Path(d).is_dir():
                raise ValueError(f"--results/--pool {d} is not a directory of gradual.py results")

    def pool_list(self) -> list[str]:
        return [d for d in self.pool.split(",") if d]


# ----------------------------------------------------------------------------- statistics (pure)


def seed_interval(per_seed: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean over S seeds: mean(d_s) +- t(0.975, S - 1) sd(d_s) / sqrt(S); (nan, nan) for
    one seed, which says nothing about run-to-run spread."""
    S = len(per_seed)
    if S < 2:
        return math.nan, math.nan
    half = t_quantile(S - 1) * per_seed.std(ddof=1) / math.sqrt(S)
    return float(per_seed.mean() - half), float(per_seed.mean() + half)


def t_quantile(df: int) -> float:
    """t(0.975, df), the two-sided 95% quantile of Student's t."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def seeds_for(per_seed: np.ndarray, half: float) -> int | None:
    """The fewest seeds whose t-interval would have half-width <= `half` at this spread of per-seed means."""
    if len(per_seed) < 2:
        return None
    sd = per_seed.std(ddof=1)
    return next(S for S in range(2, 10**6) if t_quantile(S - 1) * sd / math.sqrt(S) <= half)


def hierarchical_bootstrap(d: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(d) for d (S seeds, n problems), resampling seeds, then problems within each
    resampled seed: replicate b is mean over k of mean(d[s*_k, i*_k]), s* ~ S of S seeds and for each a fresh
    i*_k ~ n of n problems, with replacement."""
    rng = np.random.default_rng(seed)
    S, n = d.shape
    s = rng.integers(0, S, (reps, S))  # (reps, S) seeds of each replicate
    i = rng.integers(0, n, (reps, S, n))  # (reps, S, n) problems within each
    means = d[s[..., None], i].mean((1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def problem_half_width(d: np.ndarray, reps: int, seed: int = 0) -> float:
    """Within-seed precision: the mean over seeds of the half-width of a 95% paired bootstrap over one seed's n
    problems (the interval one training run alone would give)."""
    halves = [np.diff(hierarchical_bootstrap(row[None], reps, seed))[0] / 2 for row in d]
    return float(np.mean(halves))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (also the sign test for b seeds above zero and
    c below): under H0 each goes either way with probability 1/2, so p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b,
    c)))."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


# ----------------------------------------------------------------------------- the results


def load(results: Path) -> dict[str, dict]:
    """{cell: its result}; every model must have answered the same problems in the same order."""
    cells = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    if "dense" not in cells:
        raise FileNotFoundError(f"{results} holds no dense.json: run scripts/gradual.py first")
    problems = cells["dense"]["problems"]
    for name, c in cells.items():
        if c["problems"] != problems[: len(c["problems"])]:
            raise ValueError(f"{name} answered other problems than the dense model: results are not paired")
    return cells


def pooled(dirs: list[Path]) -> dict[str, dict]:
    """The compressed cells of several directories as one set whose seed is (directory index, seed): runs from
    different dense models are different units, and compare() pairs only cells of one directory."""
    sets = [load(d) for d in dirs]
    for d, cells in zip(dirs[1:], sets[1:]):
        if cells["dense"]["problems"] != sets[0]["dense"]["problems"]:
            raise ValueError(f"{d} answered other problems than {dirs[0]}: results are not paired")
    return {f"{k}/{name}": {**c, "seed": (k, c["seed"])} for k, cells in enumerate(sets)
            for name, c in cells.items() if name != "dense"}


def group(cells: dict, method: str, size: float, budget: int) -> dict[int, dict]:
    """{seed: result} of one method at one size and budget."""
    return {c["seed"]: c for c in cells.values() if (c["method"], c["size"], c["budget"]) == (method, size, budget)}


def compare(cells: dict, size: float, budget: int, reps: int, a: str = "ptl", b: str = "once") -> dict | None:
    """A - B (two methods) at one size and budget, paired on the seeds both have (None if they share none):
    differences of accuracy (points) and of gold log-prob, per problem and seed; seed-level intervals first."""
    ga, gb = group(cells, a, size, budget), group(cells, b, size, budget)
    seeds = sorted(set(ga) & set(gb))
    if not seeds:
        return None
    acc_a, acc_b = (np.array([g[s]["correct"] for s in seeds], dtype=float) for g in (ga, gb))  # (S, n)
    d = 100 * (acc_a - acc_b)
    dl = np.array([ga[s]["gold_logprobs"] for s in seeds]) - np.array([gb[s]["gold_logprobs"] for s in seeds])
    per, per_lp = d.mean(1), dl.mean(1)
    b_s, c_s = ((acc_a == 1) & (acc_b == 0)).sum(1), ((acc_a == 0) & (acc_b == 1)).sum(1)
    return {"a": a, "b": b, "size": size, "budget": budget, "seeds": seeds, "n": d.shape[1],
            "acc_diff": float(per.mean()), "acc_ci": seed_interval(per), "acc_boot": hierarchical_bootstrap(d, reps),
            "acc_per_seed": per.tolist(), "acc_within": problem_half_width(d, reps // 10),
            "sign": (int((per > 0).sum()), int((per < 0).sum())),
            "sign_p": mcnemar_exact(int((per > 0).sum()), int((per < 0).sum())),
            "seeds_for_3": seeds_for(per, 3.0),
            "mcnemar": [(int(x), int(y), mcnemar_exact(int(x), int(y))) for x, y in zip(b_s, c_s)],
            "discordant": float((b_s + c_s).sum() / d.size),
            "lp_diff": float(per_lp.mean()), "lp_ci": seed_interval(per_lp), "lp_per_seed": per_lp.tolist()}


def summary(cells: dict, method: str, size: float, budget: int) -> dict:
    """Mean and s.d. over seeds of one method's accuracy, gold log-prob and retention; its size and recovery."""
    runs = list(group(cells, method, size, budget).values())
    acc = np.array([100 * np.mean(c["correct"]) for c in runs])
    lp = np.array([np.mean(c["gold_logprobs"]) for c in runs])
    dense = 100 * np.mean(cells["dense"]["correct"])
    def sd(x: np.ndarray) -> float | None:
        return float(x.std(ddof=1)) if len(x) > 1 else None
    return {"method": method, "size": size, "budget": budget, "seeds": len(runs), "params": runs[0]["params"],
            "layers": runs[0]["layers"], "width": runs[0]["width"], "hidden": runs[0].get("hidden"),
            "rounds": runs[0]["rounds"],
            "acc": float(acc.mean()), "acc_sd": sd(acc), "retention": float(acc.mean() / dense) if dense else None,
            "lp": float(lp.mean()), "lp_sd": sd(lp), "tokens": float(np.mean([c["train_tokens"] for c in runs])),
            "train_min": float(np.mean([c["train_s"] for c in runs])) / 60}


# ----------------------------------------------------------------------------- tables and curves


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def budget_label(budget: int) -> str:
    return f"{budget} texts" if budget else "no recovery"


def mean_sd(mean: float, sd: float | None, spec: str) -> str:
    return f"{mean:{spec}} ± {sd:{spec}}" if sd is not None else f"{mean:{spec}}"


def model_table(cells: dict, sizes: list[float], budgets: dict) -> str:
    d = cells["dense"]
    head = ["removed (non-emb.)", "model", "recovery", "seeds", "layers x width", "params", "rounds",
            "accuracy (%)", "retention", "gold log-prob", "recovery tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| 0% | dense | — | — | {d['layers']} x {d['width']} | {human(d['params']['total'])} | — | "
             f"{100 * np.mean(d['correct']):.1f} | 1.00 | {np.mean(d['gold_logprobs']):.4f} | — |"]
    for size in sizes:
        for budget in budgets[size]:
            for method in LABEL:
                if not group(cells, method, size, budget):
                    continue
                s = summary(cells, method, size, budget)
                narrow = s["hidden"] and s["hidden"] < max(c.get("hidden") or 0 for c in cells.values())
                shape = f"{s['layers']} x {s['width']}" + (f", hidden {s['hidden']}" if narrow else "")
                lines.append(f"| {100 * size:.0f}% | {LABEL[method]} | {budget_label(budget)} | {s['seeds']} | "
                             f"{shape} | {human(s['params']['total'])} | {s['rounds']} | "
                             f"{mean_sd(s['acc'], s['acc_sd'], '.1f')} | {fmt(s['retention'], '.2f')} | "
                             f"{mean_sd(s['lp'], s['lp_sd'], '.4f')} | {human(s['tokens']) if s['tokens'] else '—'} |")
    return "\n".join(lines) + "\n"


def diff_table(comps: list[dict]) -> str:
    """A - B per size and budget: the seed-level interval first, then the per-seed means, the sign test over seeds,
    within-seed precision, McNemar per seed, and the gold log-prob difference (also over seeds)."""
    head = ["removed (non-emb.)", "recovery", "seeds", "A − B", "accuracy (points) [95% CI over seeds]",
            "hierarchical bootstrap", "per seed", "sign test +/−, p", "within-seed ±", "seeds for ±3",
            "McNemar p per seed", "gold log-prob [95% CI over seeds]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comps:
        (lo, hi), (blo, bhi), (llo, lhi) = c["acc_ci"], c["acc_boot"], c["lp_ci"]
        ci = f"[{lo:+.1f}, {hi:+.1f}]" if len(c["seeds"]) > 1 else "[one seed]"
        lp_ci = f"[{llo:+.4f}, {lhi:+.4f}]" if len(c["seeds"]) > 1 else "[one seed]"
        lines.append(f"| {100 * c['size']:.0f}% | {budget_label(c['budget'])} | {len(c['seeds'])} | "
                     f"{LABEL[c['a']]} − {LABEL[c['b']]} | {c['acc_diff']:+.1f} {ci} | [{blo:+.1f}, {bhi:+.1f}] | "
                     f"{', '.join(f'{x:+.1f}' for x in c['acc_per_seed'])} | "
                     f"{c['sign'][0]}/{c['sign'][1]}, p = {c['sign_p']:.2g} | {c['acc_within']:.1f} | "
                     f"{fmt(c['seeds_for_3'], 'd')} | {', '.join(f'{p:.2g}' for *_, p in c['mcnemar'])} | "
                     f"{c['lp_diff']:+.4f} {lp_ci} |")
    return "\n".join(lines) + "\n"


def jaccard(a: dict, b: dict) -> float:
    """|A ∩ B| / |A ∪ B| of two cells' removed neurons, as (dense layer, neuron) pairs over the layers both keep."""
    both = set(a["removed_neurons"]) & set(b["removed_neurons"])
    A = {(l, j) for l in both for j in a["removed_neurons"][l]}
    B = {(l, j) for l in both for j in b["removed_neurons"][l]}
    return len(A & B) / len(A | B) if A | B else 1.0


def units_table(cells: dict, sizes: list[float], budgets: dict) -> str:
    """Per method with recorded units: the removed layers of each seed, and the mean over shared seeds of the
    Jaccard overlap of its removed neurons with Prune-Once's and with continuous PTL's."""
    head = ["removed (non-emb.)", "model", "seeds", "removed layers per seed", "Jaccard with Prune-Once",
            "Jaccard with PTL, one schedule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        for budget in budgets[size]:
            runs = {m: {s: c for s, c in group(cells, m, size, budget).items() if "removed_neurons" in c}
                    for m in LABEL}
            for m, by_seed in runs.items():
                if not by_seed:
                    continue
                layers = "; ".join(",".join(map(str, by_seed[s]["removed_layers"])) for s in sorted(by_seed))
                overlap = [fmt(np.mean(js), ".3f") if (js := [jaccard(by_seed[s], runs[o][s]) for s in by_seed
                                                              if s in runs[o]]) else "—" for o in ("once", "ptlc")]
                lines.append(f"| {100 * size:.0f}% | {LABEL[m]} ({budget_label(budget)}) | {len(by_seed)} | {layers} | "
                             f"{overlap[0]} | {overlap[1]} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot_curves(cells: dict, size: float, budgets: list[int], out: Path) -> None:
    """dense_curve.png (the skill as the dense model learns it) and budget_curve.png (retention against recovery
    tokens at one size, PTL and Prune-Once, mean and the seeds' range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = sorted((c for c in cells.values() if c["step"] is not None), key=lambda c: c["step"])
    snaps.append(cells["dense"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tok = [c["train_tokens"] / 1e3 for c in snaps]
    ax.plot(tok, [100 * np.mean(c["correct"]) for c in snaps], "o-", label="accuracy (%)")
    ax.set(xlabel="training tokens (K)", ylabel="held-out accuracy (%)", title="the dense model's skill")
    lp = ax.twinx()
    lp.plot(tok, [np.mean(c["gold_logprobs"]) for c in snaps], "s--", color="grey", label="gold log-prob")
    lp.set_ylabel("gold log-prob (mean per token)")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dense_curve.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    dense_acc, dense_lp = 100 * np.mean(cells["dense"]["correct"]) or np.nan, np.mean(cells["dense"]["gold_logprobs"])
    for method, colour in (("ptl", "C0"), ("once", "C1")):
        runs = [list(group(cells, method, size, b).values()) for b in budgets]
        runs = [r for r in runs if r]
        x = [np.mean([c["train_tokens"] for c in r]) / 1e3 for r in runs]
        for ax, value in ((axes[0], lambda c: 100 * np.mean(c["correct"]) / dense_acc),
                          (axes[1], lambda c: np.mean(c["gold_logprobs"]) - dense_lp)):
            ys = [[value(c) for c in r] for r in runs]
            mean = [np.mean(y) for y in ys]
            err = [[m - min(y) for m, y in zip(mean, ys)], [max(y) - m for m, y in zip(mean, ys)]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=colour, label=LABEL[method])
    axes[0].set(xlabel="recovery tokens (K)", ylabel="retention (accuracy / dense)")
    axes[1].set(xlabel="recovery tokens (K)", ylabel="gold log-prob − dense")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{100 * size:.0f}% of non-embedding parameters removed; mean and range over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "budget_curve.png", dpi=120)
    plt.close(fig)


def comparisons(cells: dict, reps: int) -> tuple[list[float], dict, list[dict]]:
    """(sizes, budgets per size, every A - B of PAIRS that has shared seeds)."""
    compressed = [c for c in cells.values() if c["method"] in LABEL]
    sizes = sorted({c["size"] for c in compressed})
    budgets = {s: sorted({c["budget"] for c in compressed if c["size"] == s}) for s in sizes}
    return sizes, budgets, [c for s in sizes for b in reversed(budgets[s]) for x, y in PAIRS
                            if (c := compare(cells, s, b, reps, x, y))]


def main(cfg: Config) -> dict:
    if cfg.pool_list():
        return main_pooled(cfg)
    results = Path(cfg.results)
    cells = load(results)
    sizes, budgets, comps = comparisons(cells, cfg.reps)
    curve = max(sizes, key=lambda s: len(budgets[s]))
    d = cells["dense"]
    snaps = sorted((c for c in cells.values() if c["step"] is not None), key=lambda c: c["step"])
    md = (f"Dense: {human(d['train_tokens'])} training tokens; every model answers the same {d['n']} held-out "
          "problems.\n\n" + model_table(cells, sizes, budgets) + "\n" + diff_table(comps))
    if units := units_table(cells, sizes, budgets):
        md += "\nRemoved units (dense numbering):\n\n" + units
    md += ("\nDense curve (steps, training tokens: held-out accuracy % on the first "
           f"{snaps[0]['n'] if snaps else 0} problems, gold log-prob): "
           + "; ".join(f"{c['step']}, {human(c['train_tokens']) if c['train_tokens'] else 0}: "
                       f"{100 * np.mean(c['correct']):.1f}, {np.mean(c['gold_logprobs']):.4f}" for c in snaps) + "\n")
    (results / "table.md").write_text(md)
    plot_curves(cells, curve, budgets[curve], results)
    print(md)
    return {"markdown": md, "comparisons": comps}


def main_pooled(cfg: Config) -> dict:
    """Each directory's tables (main without --pool), then the comparisons over the runs of all of them."""
    dirs = [Path(d) for d in [cfg.results, *cfg.pool_list()]]
    parts = [main(replace(cfg, results=str(d), pool="")) for d in dirs]
    _, _, comps = comparisons(pooled(dirs), cfg.reps)
    md = (f"Pooled: the runs of {', '.join(map(str, dirs))}, a unit being (dense model, seed):\n\n"
          + diff_table(comps))
    (dirs[0] / "pooled.md").write_text(md)
    print(md)
    return {"markdown": "\n".join(p["markdown"] for p in parts) + "\n" + md, "comparisons": comps,
            "each": parts}


if __name__ == "__main__":
    run_cli(main, Config)
