"""What a PTL run did, in words and in Table 1's columns: the progress line of each round, the run's closing summary,
report.md and rounds.png (`evaluate.py --report`), and the FLOPs they count.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from models import DEFAULT_MODEL, load_config
from ptl_common import atomic_write_json, count_params, finished_rounds, human, load_record, print0

# ----------------------------------------------------------------------------- FLOPs (pure)


def forward_flops(config, seq_len: int, batch: int = 1) -> int:
    """FLOPs of one decoder forward pass over `batch` sequences of `seq_len` tokens, from the config:
    per layer 2·T·h·d_h·(n_q + 2·n_kv) (q, k, v) + 2·T·n_q·d_h·h (o) + 2·2·n_q·T²·d_h (scores and values, the full
    T×T square, as eager attention computes it) + 3·2·T·h·I (gate, up, down) (+ 2·2·T·h² for the shortcuts of a
    SliceGPT model, whose h is the sliced width); plus the LM head 2·T·h·V.
    Embedding lookups cost nothing; norms, rotary and activations are not matmuls and are not counted."""
    h, L, I, V, T = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size, seq_len
    n_q, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d_h = getattr(config, "head_dim", None) or h // n_q
    per_layer = 2 * T * h * d_h * (n_q + 2 * n_kv) + 2 * T * n_q * d_h * h + 4 * n_q * T * T * d_h + 6 * T * h * I
    per_layer += 4 * T * h * h if getattr(config, "slicegpt", None) else 0  # SliceGPT's two shortcuts, h x h each
    return batch * (L * per_layer + 2 * T * h * V)


# ----------------------------------------------------------------------------- lines


def summary_line(name: str, res: dict) -> str:
    def one(r: dict) -> str:
        acc = f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else ""
        f1 = f" F1 {100 * r['f1']:.1f}" if "f1" in r else ""
        lp = f" gold log-prob {r['gold_logprob']:.4f}" if r.get("gold_logprob") is not None else ""
        return f"{acc}{f1}{lp} (n={r['n']})".strip()
    return f"{name}: " + " | ".join(f"{t} {one(r)}" for t, r in res.items())


def score_summary(s_neu: torch.Tensor, s_lay: torch.Tensor, k: int) -> dict:
    """Per layer min / median / max neuron score, and the effective sigma: the largest of the k removed."""
    fin = s_neu.masked_fill(s_neu.isinf(), float("nan"))
    return {"neuron_min": fin.nan_to_num(math.inf).amin(1).tolist(), "neuron_median": fin.nanmedian(1).values.tolist(),
            "neuron_max": fin.nan_to_num(-math.inf).amax(1).tolist(),
            "sigma_neuron_effective": torch.sort(s_neu, 1).values[:, k - 1].tolist() if k else None,
            "layer": s_lay.tolist()}


def round_line(rec: dict, model) -> str:
    """The progress line of a finished round."""
    kind, after, P0 = rec["kind"], rec["params_after"]["total"], rec["dense"]["params"]["total"]
    cut = (f"-{rec['neurons_per_layer'] or len(rec['removed_layers'])}" if kind in ("neurons", "layers") else
           f"hidden {rec['dense']['hidden_size']} -> {rec['hidden_size']}" if kind == "slicegpt" else
           f"-{rec['neurons_per_layer']} neurons -{len(rec['removed_layers'])} layers")
    return (f"round {rec['round']} | {kind} {cut} | width {model.config.intermediate_size} | layers "
            f"{model.config.num_hidden_layers} | params {human(after)} ({1 - after / P0:.1%} removed) | "
            f"{rec['time_s']:.1f}s" + "".join(f" | {line}" for line in round_evals(rec)))


def round_evals(rec: dict) -> list[str]:
    """The summary lines of a round's evaluations: after the cut ("pruned") and after recovery ("recovered")."""
    labels = (("eval_pruned", "pruned"), ("eval", "recovered" if "recovery" in rec else "pruned"))
    return [summary_line(name, rec[key]) for key, name in labels if key in rec]



def reading(dense_eval: dict) -> str:
    """How to read a run's quality lines: what "pruned" follows, and what accuracy from 0% on the dense model needs."""
    line = ("  reading: \"pruned\" is a round right after its cut, which follows the previous round's recovery; "
            "\"recovered\" is after its own recovery; gold log-prob (closer to 0 is better) moves before accuracy")
    if any(r.get("accuracy") == 0 for r in dense_eval.values()):
        line += ("\n  accuracy 0% on the dense model: it does not write the answer in the form the grader reads "
                 "(\\boxed{N}); any rise after recovery needs that form first, which the recovery texts teach")
    return line


def summary(out: Path, records: list[dict], dense_eval: dict | None, cfg) -> str:
    """What a run did, in a few lines: the size, each round's quality (dense -> pruned -> recovered), where the
    checkpoints are, and what to run next."""
    last = load_record(out / f"round_{finished_rounds(out)[-1]}")
    P0, P = last["dense"]["params"]["total"], last["params_after"]["total"]
    T = last["round"]
    lines = [f"done: {human(P0)} -> {human(P)} parameters ({1 - P / P0:.1%} removed) in {T} round{'s' * (T > 1)}: "
             f"{last['dense']['num_hidden_layers']} -> {len(last['kept_layers'])} layers, FFN width "
             f"{last['dense']['intermediate_size']} -> {len(last['kept_neurons'][0])}" + (
                 f", hidden size {last['dense']['hidden_size']} -> {last['hidden_size']}" if "hidden_size" in last
                 else "")]
    if dense_eval:
        lines.append(f"  {summary_line('dense', dense_eval)}")
    for r in records:
        lines += [f"  round {r['round']}: {line}" for line in round_evals(r)]
    if dense_eval and any("eval_pruned" in r for r in records):
        lines.append(reading(dense_eval))
    model = "smollm2-135m" if cfg.model == DEFAULT_MODEL else cfg.model
    sliced = load_config(out / f"round_{T}").model_type == "ptl_slicegpt"
    kind = ("SliceGPT ones: models.load_model reads them, stock loaders cannot" if sliced
            else "ordinary Hugging Face ones")
    lines.append(f"checkpoints ({kind}): {out}/round_1" + (f" .. round_{T}" if T > 1 else ""))
    return "\n".join(lines + next_commands(model, out, T, bool(dense_eval)))


def next_commands(model: str, out: Path, T: int, evaluated: bool) -> list[str]:
    """What to run next, each a few minutes on the default model and 2 CPU cores: with the rounds evaluated, the
    speed against the dense model (gold log-prob only: the accuracy is above) and the report; else accuracy too."""
    what = "--metrics gold_logprob" if evaluated else "--metrics accuracy,gold_logprob --max-new-tokens 200"
    what += " --warmup 1 --repeats 3"  # a first look at the speed; the default 3 + 5 timed runs take twice as long
    lines = [f"next: python evaluate.py --model {model} --compare {out}/round_{T} --tasks offline --limit 100 {what}"
             "     # speed and FLOPs against the dense model" + ("" if evaluated else ", and held-out accuracy")]
    if evaluated:
        lines.append(f"      python evaluate.py --report {out}     # report.md and rounds.png: the curve per round")
    return lines
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report of a PTL run (Table 1)


def run_result(out: Path, model, state, records: list[dict], dense_eval: dict | None, cfg) -> dict:
    """ptl.main's result, after printing what the run did; state: its ptl.LoopState at the end."""
    final = count_params(model)
    result = {"rounds": state.round, "out": str(out / f"round_{state.round}") if state.round else None,
              "params": final, "removed_ratio": 1 - final["total"] / state.dense["params"]["total"],
              "records": records}
    if not state.round:
        print0(f"{out}: no round removed anything (the thresholds found nothing redundant)")
    elif not records:
        print0(f"{out}: nothing left to do; the last round is {result['out']}")
    else:
        print0(summary(out, records, dense_eval, cfg))
    return result


def write_report(run: str | Path) -> dict:
    """Table 1's columns for the dense model and every round of the PTL run in `run`: parameters, compression
    ratio R = 1 - |M'|/|M|, accuracy per benchmark and its retention Perf(M')/Perf(M) (from `ptl.py
    --eval-every-round`: dense_eval.json and each ptl_record.json), FLOPs per question, the FLOP ratio at 128
    tokens (the authors' calflops setting), recovery time (cumulative). Writes report.json, report.md and
    rounds.png (Figure 3 / Table 6: accuracy and size per round) into `run`."""
    run = Path(run)
    rounds = finished_rounds(run)
    if not rounds:
        raise FileNotFoundError(f"{run} holds no finished PTL round (round_<t>/ptl_record.json): run ptl.py first")
    recs = [load_record(run / f"round_{t}") for t in rounds]
    dense_cfg = load_config(run / f"round_{rounds[0]}")
    dense_cfg.num_hidden_layers = recs[0]["dense"]["num_hidden_layers"]
    dense_cfg.intermediate_size = recs[0]["dense"]["intermediate_size"]
    dense_cfg.hidden_size = recs[0]["dense"].get("hidden_size", dense_cfg.hidden_size)  # SliceGPT narrows it
    dense_cfg.slicegpt = None
    dense_eval = json.loads((run / "dense_eval.json").read_text()) if (run / "dense_eval.json").exists() else {}
    f0 = forward_flops(dense_cfg, 128)
    rows, recovery = [], 0.0
    entries = [("dense", recs[0]["dense"]["params"], dense_cfg, dense_eval, None)]
    entries += [(f"round {r['round']} ({r['kind']})", r["params_after"], load_config(run / f"round_{t}"),
                 r.get("eval", {}), r) for t, r in zip(rounds, recs)]
    for label, params, conf, ev, r in entries:
        recovery += sum(v.get("time_s", 0.0) for v in (r or {}).get("recovery", {}).values())
        rows.append({"model": label, "params": params["total"], "non_embedding": params["non_embedding"],
                     "removed": 1 - params["total"] / recs[0]["dense"]["params"]["total"],
                     "accuracy": {k: v["accuracy"] for k, v in ev.items() if "accuracy" in v},
                     "gold_logprob": {k: v["gold_logprob"] for k, v in ev.items() if v.get("gold_logprob") is not None},
                     "flops_per_question": {k: v.get("flops_per_question") for k, v in ev.items()},
                     "flops_128": forward_flops(conf, 128), "flop_ratio_128": f0 / forward_flops(conf, 128),
                     "recovery_s": recovery,
                     "layers": conf.num_hidden_layers, "width": conf.intermediate_size})
    tasks = sorted({k for r in rows for k in r["accuracy"]})
    for r in rows:  # performance retention Perf(M') / Perf(M) (the related study's metric), per benchmark
        r["retention"] = {t: r["accuracy"][t] / rows[0]["accuracy"][t] for t in r["accuracy"]
                          if rows[0]["accuracy"].get(t)}
    md = f"# PTL run `{run}`\n\n" + report_table(rows, tasks)
    (run / "report.md").write_text(md)
    atomic_write_json(run / "report.json", {"rows": rows})
    _plot(rows, tasks, run / "rounds.png")
    return {"rows": rows, "markdown": md}


def report_table(rows: list[dict], tasks: list[str]) -> str:
    """write_report's markdown: a legend, then one row per model."""
    lp = sorted({k for r in rows for k in r["gold_logprob"]})
    head = ["model", "params", "R", "layers", "FFN width", *tasks, *(f"{t} gold log-prob" for t in lp), "retention",
            "GFLOPs/question", "GFLOPs (128 tokens)", "FLOP ratio", "recovery"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fq = [x for x in r["flops_per_question"].values() if x]
        cells = [r["model"], human(r["params"]), f"{r['removed']:.1%}", str(r["layers"]), str(r["width"]),
                 *(f"{100 * r['accuracy'][t]:.1f}" if t in r["accuracy"] else "—" for t in tasks),
                 *(f"{r['gold_logprob'][t]:.4f}" if t in r["gold_logprob"] else "—" for t in lp),
                 f"{statistics.mean(r['retention'].values()):.2f}" if r["retention"] else "—",
                 f"{statistics.mean(fq) / 1e9:.1f}" if fq else "—", f"{r['flops_128'] / 1e9:.1f}",
                 f"{r['flop_ratio_128']:.2f}x", f"{r['recovery_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    measured = ", ".join(tasks) or "no evaluation recorded: ptl.py --eval-every-round"
    return (f"Accuracy in % ({measured}); gold log-prob = the mean log-probability of the reference solution's "
            "tokens, where recorded (it moves before accuracy does on a small model). R = 1 - params / dense params "
            "(compression ratio); retention = accuracy / dense accuracy, averaged over the benchmarks; GFLOPs/question "
            "counts each question's own prompt and generated length (a model that stops early looks cheaper), "
            "GFLOPs (128 tokens) one forward of a pinned length; FLOP ratio = dense / this model at 128 tokens; "
            "recovery time cumulative.\n\n" + "\n".join(lines) + "\n")


def _plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in tasks:
        pts = [(i, 100 * r["accuracy"][t]) for i, r in zip(x, rows) if t in r["accuracy"]]
        ax.plot(*zip(*pts), marker="o", label=t)
    ax.set(xlabel="round (0 = dense)", ylabel="accuracy (%)", xticks=x)
    size = ax.twinx() if tasks else ax  # no evaluation recorded: the size curve alone
    size.plot(x, [r["params"] / 1e6 for r in rows], "k--", marker="s", label="params")
    size.set_ylabel("parameters (M)")
    fig.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
