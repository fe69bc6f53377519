"""Does gradual beat one cut? PTL against Prune-Once at an equal recovery budget, with seeds, two sizes, a budget
curve and paired statistics: the experiment of docs/gradual.md.

    python scripts/gradual.py                                # the whole experiment; re-running resumes
    python scripts/gradual.py --cell ptl-45-b560-s2          # one cell (method, size, budget, seed) on its own
    python scripts/gradual.py --print                        # the commands it runs, without running them
    python scripts/gradual_stats.py                          # every number of docs/gradual.md, from the results

Design, fixed before any compressed model was evaluated (the defaults of Config below; the dense model and its
curve were measured first, to size the rest):
1. A skill that recovery cannot re-teach. The dense model is SmolLM2-135M-Instruct after continual pre-training on
   --dense-samples offline chain-of-thought arithmetic texts (sums of up to five 3-digit numbers, and leg
   counting; seed 0; 596K tokens), long enough for held-out accuracy to level off (snapshots every
   --snapshot-every steps make the curve). Every compressed model then recovers on --budget texts of the same
   generator (other problems: recovery seeds 101, 102, ...; 70K tokens): an eighth of what taught the skill.
   Recovering on the same generator keeps the answer format, so that accuracy measures the skill, not the
   format; the budget ratio keeps recovery from re-teaching it (the same budget, spent on the starting model,
   is the dense curve's first point).
2. Equal budgets. At each size (--sizes: fractions of the non-embedding parameters removed), PTL removes
   --neuron-step of the FFN width per round (a remainder under half a step joins the last neuron round), then
   --layer-target single-layer rounds, recovering on budget / rounds texts after each round; Prune-Once removes
   as many neurons and layers in one cut, then recovers on the whole budget: the same texts, in one run.
   Prune-Once without recovery shows the damage that recovery repairs.
3. Seeds: seed s draws its own calibration sample (seed s) and its own recovery texts and order (seed 100 + s);
   PTL and Prune-Once of one seed share both. --seeds for the comparison at --budget and for Prune-Once without
   recovery; --curve-seeds for the rest of the budget curve.
4. Measurement: every model answers the same --eval-n held-out problems (`evaluate.py --tasks offline`: a
   content-hash split that no training or calibration text ever contains), greedy, and is scored by correctness
   and by the teacher-forced mean log-probability of the gold solution (`--metrics gold_logprob`), a
   continuous score with far less variance than 0/1. Statistics: scripts/gradual_stats.py.
5. A recovery-budget curve at --curve-size: PTL and Prune-Once at budget 0 (no recovery), --curve-budgets and
   --budget texts, which separates "gradual helps" from "more training helps".
6. Recovery: lr --recovery-lr (half the dense lr), --recovery-batch blocks of --max-length tokens per step,
   warmup 5% then cosine within every recovery run, bf16 autocast over fp32 master weights; calibration in fp32.
7. Other one-cut baselines (issue 14; added after 1-6 had run, fixed before any of them ran): at --baseline-size,
   with every seed and the whole --budget in one recovery run, like Prune-Once: SliceGPT (`--baseline slicegpt`,
   the same --target-ratio, so the same total parameter count), Prune-Once with LLM-Pruner's element-wise Taylor
   neuron criterion (`--neuron-rule taylor`: PTL's and Prune-Once's architecture, another choice of neurons), and
   ShortGPT (`--baseline shortgpt`: whole layers by Block Influence, the same --target-ratio). Each is compared
   with PTL, paired by seed and problem, like Prune-Once.

8. Without the confounds (issue 23; fixed before any of its models was evaluated). (a) Seeds 1-5 for PTL and
   Prune-Once at both sizes, and the seed as the unit of every interval (scripts/gradual_stats.py). (b) A second
   PTL schedule, ptlc (`--recovery-schedule continuous`): one recover.py run over the same --budget texts as
   Prune-Once's (the same texts, blocks, order and warmup + cosine), cut into one window per round, AdamW's
   moments carried across the cuts; per-round PTL (ptl) restarts AdamW and the schedule every round, as the
   paper's loop does. (c) The decomposition at --decompose-size, every seed: sel = continuous PTL's final units
   (its last round's kept layers and neurons), cut from the dense model at once with `--apply-removal` and
   recovered exactly like Prune-Once; nor = PTL's rounds with no recovery between them, their final units cut
   at once and recovered like Prune-Once. Once -> sel changes only which units go; sel -> ptlc only when they
   go (training between cuts, everything else equal); ptlc -> ptl only the per-round restarts. Every cell
   records its removed units (dense numbering) in its results. (d) The regime (45%, seeds 1-2, the schedule with
   the higher mean accuracy at 45% in (a)-(b)): 4x the budget (2,240 texts), and neuron steps 0.2 / 0.1 / 0.05
   at one budget divisible by their round counts with Prune-Once at that budget; not yet a cell of this driver.
   (e) Seeds 5 on, at 30% (added when the machine that held step 8's dense model was lost, fixed before any of
   their models was evaluated): the four arms ptl, ptlc, once, sel of each seed, run at commit 2233e31 (step 8's)
   from a dense model re-made with the same command on another machine (RESULTS results/gradual-step8-amd). A
   unit of replication is a training run, so runs from two dense models are two units:
   `gradual_stats.py --results results/gradual-step8 --pool results/gradual-step8-amd` reports each dense
   model's tables and the comparisons over the (dense model, seed) units of both, the headline from step 8 on.

Every cell is a plain recover.py / ptl.py / evaluate.py command; --jobs of them run at once, the CPU cores split
between them. A cell leaves OUT/<cell>/ (its final model, for other benchmarks later: the last round_<T>/ of a
ptl.py run; earlier rounds keep their records, not their weights) and RESULTS/<cell>.json (each problem's
correctness and gold log-probability), from which scripts/gradual_stats.py computes docs/gradual.md's tables and
budget curve. A finished cell is skipped; one made with other settings is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import DEFAULT_MODEL, resolve_model  # noqa: E402
from ptl_common import atomic_write_json, finished_rounds, flag, load_record, parse_config, run_cli  # noqa: E402

PY = sys.executable


@dataclass
class Config:
    """Gradual (PTL) against one cut (Prune-Once) at an equal recovery budget, powered and paired."""
    out: str = flag("out/gradual", "checkpoints and logs of every cell")
    results: str = flag("results/gradual", "one JSON of per-problem results per model")
    model: str = flag(DEFAULT_MODEL, "the model the dense phase teaches the skill to")
    dense_samples: int = flag(4800, "offline texts that teach the dense model its skill")
    dense_lr: float = flag(2e-4, "peak lr of the dense model's training")
    dense_batch: int = flag(8, "blocks per step of the dense model's training")
    snapshot_every: int = flag(30, "dense training steps between curve snapshots")
    sizes: str = flag("0.30,0.45", "fractions of the non-embedding parameters removed")
    layer_target: int = flag(2, "layers removed at every size, after the neurons")
    neuron_step: float = flag(0.1, "PTL's neurons per round, a fraction of the width")
    budget: int = flag(560, "recovery texts per compressed model, over all its rounds")
    seeds: str = flag("1,2,3,4,5", "seeds of the comparison at --budget")
    curve_size: float = flag(0.45, "the size of the recovery-budget curve")
    curve_budgets: str = flag("140,280", "further budgets at --curve-size")
    curve_seeds: str = flag("1", "seeds of the further budgets, and of PTL without recovery (Prune-Once without: "
                                 "every seed)")
    baselines: str = flag("slicegpt,taylor,shortgpt", "one-cut baselines at --baseline-size, every seed, --budget")
    baseline_size: float = flag(0.30, "the size of the other baselines (one of --sizes)")
    baseline_seeds: str = flag("1,2,3", "seeds of the other baselines")
    decompose_size: float = flag(0.30, "the size of the decomposition: PTL's units cut once (sel), PTL's rounds "
                                       "without recovery then one recovery (nor)")
    recovery_lr: float = flag(1e-4, "peak lr of every recovery run")
    recovery_batch: int = flag(4, "blocks per recovery step")
    micro_batch: int = flag(4, "blocks per forward pass, in every training")
    max_length: int = flag(256, "tokens per block (training) and calibration text")
    calib_samples: int = flag(64, "calibration texts per pruning round")
    eval_n: int = flag(500, "held-out problems that every model answers")
    curve_eval_n: int = flag(200, "held-out problems each dense-curve snapshot answers")
    max_new_tokens: int = flag(200, "the longest gold solution of --eval-n is 176 tokens")
    eval_batch: int = flag(250, "questions per generate batch")
    eval_dtype: str = flag("bfloat16", "evaluate.py --dtype")
    jobs: int = flag(2, "cells run at once (the CPU cores are split between them)")
    cell: str = flag("", "run only these cells, comma-separated (after the dense model and the cells they start "
                         "from)")
    in_process: bool = flag(False, "run every command inside this process, one at a time (the tiny-model test)")
    print: bool = flag(False, "print the commands instead of running them")

    def __post_init__(self):
        if self.jobs < 1 or self.budget < 1 or self.eval_n < 1 or not self.seed_list():
            raise ValueError("need --jobs >= 1, --budget >= 1, --eval-n >= 1 and at least one seed")
        if self.curve_size not in self.size_list():
            raise ValueError(f"--curve-size {self.curve_size} must be one of --sizes {self.sizes}")
        unknown = set(self.baseline_list()) - (set(ONE_CUT) - {"once"})  # Prune-Once always runs
        if unknown:
            raise ValueError(f"--baselines: unknown {sorted(unknown)}; choose from {', '.join(list(ONE_CUT)[1:])}")
        for name in ("baseline_size", "decompose_size"):
            if getattr(self, name) not in self.size_list():
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be one of --sizes "
                                 f"{self.sizes}")

    def size_list(self) -> list[float]:
        return [float(x) for x in self.sizes.split(",") if x]

    def seed_list(self) -> list[int]:
        return [int(x) for x in self.seeds.split(",") if x]

    def baseline_list(self) -> list[str]:
        return [x for x in self.baselines.split(",") if x]

    def plan(self, size: float) -> list[tuple[int, int, str]]:
        """(budget, seed, method) of every compressed model at `size`: PTL with each recovery schedule (ptl:
        per-round, ptlc: continuous) and Prune-Once at --budget, and Prune-Once without recovery, with every seed;
        at --curve-size, PTL without recovery and PTL and Prune-Once at --curve-budgets with --curve-seeds; at
        --baseline-size the other one-cut baselines; at --decompose-size, sel and nor with every seed."""
        seeds, few = self.seed_list(), [int(x) for x in self.curve_seeds.split(",") if x]
        todo = [(self.budget, s, m) for s in seeds for m in ("ptl", "ptlc", "once")] + [(0, s, "once") for s in seeds]
        if size == self.curve_size:
            todo += [(0, s, "ptl") for s in few]
            todo += [(int(b), s, m) for b in self.curve_budgets.split(",") if b for s in few for m in ("ptl", "once")]
        if size == self.baseline_size:
            todo += [(self.budget, int(s), m) for s in self.baseline_seeds.split(",") if s
                     for m in self.baseline_list()]
        if size == self.decompose_size:
            todo += [(self.budget, s, m) for s in seeds for m in ("sel", "nor")]
        return todo


# ptl.py flags of the one-cut methods: Prune-Once and the baselines of step 7 (SliceGPT and ShortGPT take their size
# from --target-ratio alone).
ONE_CUT = {"once": ["--baseline", "prune-once"], "taylor": ["--baseline", "prune-once", "--neuron-rule", "taylor"],
           "slicegpt": ["--baseline", "slicegpt"], "shortgpt": ["--baseline", "shortgpt"]}

# Settings that do not change what a cell computes: how and where the driver runs.
# Which cells run, not how each is made:
NOT_SETTINGS = {"out", "results", "jobs", "cell", "in_process", "print", "baselines", "seeds", "baseline_seeds",
                "decompose_size"}


class Cell(NamedTuple):
    name: str  # e.g. ptl-45-b560-s2; dense; dense-step30
    method: str  # ptl, once, or dense (the dense model and its curve snapshots)
    size: float  # fraction of the non-embedding parameters removed
    budget: int  # recovery texts in all
    seed: int
    train: list[list[str]]  # commands that make the model (none for a snapshot)
    model: Path  # the model that is evaluated: a checkpoint directory, or a ptl.py run's last round
    needs: str = ""  # the cell whose final model this one's commands read (sel: its plan), run first


def shape(cfg: Config, size: float) -> tuple[float, int]:
    """(ptl.py --target-ratio, PTL's number of rounds) for `size`, a fraction of the non-embedding parameters, on
    the model that the dense phase trains. Built on the meta device: only its config is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import ptl
    from ptl_common import count_params

    conf = AutoConfig.from_pretrained(resolve_model(cfg.model))  # outside the meta device: it may build the model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    p = count_params(model)
    ratio = round(size * p["non_embedding"] / p["total"], 6)
    neurons = ptl.neuron_budget(model, ptl.Config(target_ratio=ratio, layer_target=cfg.layer_target))
    step = max(1, round(cfg.neuron_step * model.config.intermediate_size))
    return ratio, len(ptl.neuron_schedule(neurons, step)) + cfg.layer_target


def model_cells(cfg: Config) -> list[Cell]:
    """The dense model, then every compressed one (size x budget x seed x method)."""
    out, train = Path(cfg.out), ["--max-length", str(cfg.max_length), "--micro-batch", str(cfg.micro_batch),
                                 "--precision", "bf16"]
    dense = [PY, str(ROOT / "recover.py"), "--model", cfg.model, "--data", "offline", "--samples",
             str(cfg.dense_samples), "--global-batch", str(cfg.dense_batch), "--lr", str(cfg.dense_lr),
             "--keep-every", str(cfg.snapshot_every), *train, "--out", str(out / "dense")]
    todo = [Cell("dense", "dense", 0.0, 0, 0, [dense], out / "dense")]
    for size in cfg.size_list():
        ratio, rounds = shape(cfg, size)
        for budget, seed, method in cfg.plan(size):
            if budget % rounds:
                raise ValueError(f"{budget} recovery texts do not split evenly over PTL's {rounds} rounds at size "
                                 f"{size}: make --budget and --curve-budgets multiples of {rounds}")
            name = f"{method}-{round(100 * size)}-b{budget}-s{seed}"

            def recovery(texts: int) -> list[str]:  # PTL: budget / rounds texts after each round; one cut: all
                return ["--recovery", "cpt", "--cpt-flags", shlex.join(
                    ["--data", "offline", "--samples", str(texts), "--seed", str(100 + seed), "--lr",
                     str(cfg.recovery_lr), "--global-batch", str(cfg.recovery_batch), *train])] if budget else []

            def ptl(to: Path, *flags: str) -> list[str]:
                return [PY, str(ROOT / "ptl.py"), "--model", str(out / "dense"), "--out", str(to), "--target-ratio",
                        str(ratio), "--calib-samples", str(cfg.calib_samples), "--max-length", str(cfg.max_length),
                        "--seed", str(seed), *flags]

            def plan(of: Path) -> list[str]:  # of's final removal, cut from the dense model at once, recovered once
                return [PY, str(ROOT / "ptl.py"), "--model", str(out / "dense"), "--out", str(out / name),
                        "--apply-removal", str(of / f"round_{rounds}"), *recovery(budget)]

            shape_flags = ["--layer-target", str(cfg.layer_target), "--neuron-step", str(cfg.neuron_step)]
            needs, schedule = "", ["--recovery-schedule", "continuous"] if method == "ptlc" else []
            if method in ("ptl", "ptlc"):
                cmds = [ptl(out / name, *shape_flags, *schedule, *recovery(budget // rounds))]
            elif method == "sel":  # the units that continuous PTL of this seed removed
                needs = name.replace("sel", "ptlc", 1)
                cmds = [plan(out / needs)]
            elif method == "nor":  # PTL's rounds with no recovery between them, then one recovery
                cmds = [ptl(out / f"{name}-rounds", *shape_flags), plan(out / f"{name}-rounds")]
            else:  # the one-cut methods; Prune-Once and the Taylor criterion take PTL's final shape
                cmds = [ptl(out / name, *ONE_CUT[method], *(shape_flags if method in ("once", "taylor") else []),
                            *recovery(budget))]
            todo.append(Cell(name, method, size, budget, seed, cmds, out / name, needs))
    return todo


def snapshot_cells(cfg: Config) -> list[Cell]:
    """The dense model's learning curve: the starting model (step 0) and every snapshot the dense run kept."""
    snaps = sorted(Path(cfg.out, "dense").glob("step_*"), key=lambda p: int(p.name[5:]))
    start = Cell("dense-step0", "dense", 0.0, 0, 0, [], Path(resolve_model(cfg.model)))
    return [start] + [Cell(f"dense-{p.name.replace('_', '')}", "dense", 0.0, 0, 0, [], p) for p in snaps]


def evaluate_command(cfg: Config, model: Path, to: Path, n: int) -> list[str]:
    return [PY, str(ROOT / "evaluate.py"), "--model", str(model), "--tasks", "offline", "--limit", str(n),
            "--metrics", "accuracy,gold_logprob", "--max-new-tokens", str(cfg.max_new_tokens), "--batch-size",
            str(cfg.eval_batch), "--dtype", cfg.eval_dtype, "--out", str(to)]


# ----------------------------------------------------------------------------- running a cell


def settings(cfg: Config) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}


def final_model(cell: Cell) -> Path:
    """The checkpoint a cell evaluates: its model directory, or the last round of its ptl.py run."""
    if (cell.model / "config.json").exists():
        return cell.model
    rounds = finished_rounds(cell.model)
    if not rounds:
        raise FileNotFoundError(f"{cell.model} holds no model: its training did not finish")
    return cell.model / f"round_{rounds[-1]}"


def run_cell(cell: Cell, cfg: Config, threads: int) -> dict:
    """Train the cell's model (each command resumes its own partial work), evaluate it, and write RESULTS/<name>.json;
    a finished cell is returned as it is, after checking that it was made with these settings."""
    path = Path(cfg.results) / f"{cell.name}.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (v, settings(cfg).get(k)) for k, v in old["settings"].items()
                if k not in NOT_SETTINGS and settings(cfg).get(k) != v}  # old results may hold what is no setting now
        if diff:  # a setting added later (absent from old results) does not change what they computed
            raise ValueError(f"{path} was made with other settings {diff} (old, new): repeat its flags, or use "
                             "another --results and --out")
        return old
    logs, evals = Path(cfg.out, "logs"), Path(cfg.out, "evals")
    logs.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    t0 = time.time()
    with open(logs / f"{cell.name}.log", "a") as log:
        def call(cmd: list[str]) -> None:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            if cfg.in_process:
                return in_process(cmd)
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"cell {cell.name} failed; its log: {logs / (cell.name + '.log')}")
        for cmd in cell.train:
            call(cmd)
        t1, model = time.time(), final_model(cell)
        if not (evals / f"{cell.name}.json").exists():
            n = cfg.curve_eval_n if cell.name.startswith("dense-step") else cfg.eval_n
            call(evaluate_command(cfg, model, evals / f"{cell.name}.json", n))
    result = distil(cell, cfg, model, json.loads((evals / f"{cell.name}.json").read_text()), t1 - t0, time.time() - t1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    for run in {Path(cmd[cmd.index("--out") + 1]) for cmd in cell.train if "ptl.py" in cmd[1]}:
        for t in finished_rounds(run)[:-1]:  # only a run's final round keeps its weights and moments (disk)
            for f in ("model.safetensors", "moments.safetensors"):
                (run / f"round_{t}" / f).unlink(missing_ok=True)
    return result


def in_process(cmd: list[str]) -> None:
    """Run `python SCRIPT ARGS` as SCRIPT's main(parse_config(Config, ARGS)) in this process."""
    import ptl
    import recover
    from ptl_common import import_evaluate

    module = {"ptl.py": ptl, "recover.py": recover, "evaluate.py": import_evaluate()}[Path(cmd[1]).name]
    module.main(parse_config(module.Config, cmd[2:]))


def distil(cell: Cell, cfg: Config, model: Path, ev: dict, train_s: float, eval_s: float) -> dict:
    """RESULTS/<cell>.json: what the cell is, its size and recovery, and each held-out problem's outcome, in the
    order of evaluate.py's `offline` benchmark (problems are named by a hash of their text, to check alignment)."""
    import torch

    from models import from_config, load_config
    from ptl_common import count_params

    r = ev[str(model)]["offline"]
    conf = load_config(model)
    with torch.device("meta"):
        params = count_params(from_config(conf))
    recs = [load_record(cell.model / f"round_{t}") for t in finished_rounds(cell.model)]
    parts = [v for rec in recs for v in rec.get("recovery", {}).values()]
    step = int(cell.name.rsplit("step", 1)[1]) if "-step" in cell.name else None
    if cell.name == "dense":
        tokens = json.loads((model / "train_summary.json").read_text())["tokens"]
    else:
        tokens = sum(p["tokens"] for p in parts) if parts else (step or 0) * cfg.dense_batch * cfg.max_length
    return {"cell": cell.name, "method": cell.method, "size": cell.size, "budget": cell.budget, "seed": cell.seed,
            "step": step, "layers": conf.num_hidden_layers, "width": conf.intermediate_size,
            "hidden": conf.hidden_size, "params": params,
            "rounds": len(recs), "train_tokens": tokens, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "accuracy": r["accuracy"], "gold_logprob": r["gold_logprob"], "n": r["n"], "settings": settings(cfg),
            "problems": [hashlib.sha1(s["question"].encode()).hexdigest()[:10] for s in r["samples"]],
            "correct": [int(s["correct"] is True) for s in r["samples"]],
            "gold_logprobs": [round(s["gold_logprob"], 5) for s in r["samples"]],
            "pred": [s["pred"] for s in r["samples"]], **removed_units(recs[-1] if recs else None), "env": env()}


def env() -> dict:
    """What a cell's numbers depend on beyond its settings: dense training is not bitwise reproducible across CPU
    types or library versions (a dense model re-made with other ones differed on held-out accuracy by 2.4 points)."""
    import platform

    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu,
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()}


def removed_units(rec: dict | None) -> dict:
    """What a compressed model lacks, in the dense model's numbering, from its final round's record:
    {"removed_layers": [...], "removed_neurons": {layer: [...]} for every layer it kept}; {} for a dense model."""
    if rec is None:
        return {}
    L, I = rec["dense"]["num_hidden_layers"], rec["dense"]["intermediate_size"]
    return {"removed_layers": sorted(set(range(L)) - set(rec["kept_layers"])),
            "removed_neurons": {str(o): sorted(set(range(I)) - set(kn))
                                for o, kn in zip(rec["kept_layers"], rec["kept_neurons"])}}


# ----------------------------------------------------------------------------- the experiment


def run_all(cfg: Config, todo: list[Cell]) -> dict[str, dict]:
    """The dense model alone on every core; then the other cells, --jobs at a time, the longest first and a cell
    that reads another's model after it (it waits for it: that one was handed out earlier, so is running or done)."""
    cores, done, total = os.cpu_count() or 1, {}, [len(todo)]
    started, futures = time.time(), {}

    def one(cell: Cell, threads: int) -> None:
        if cell.needs in futures:
            futures[cell.needs].result()
        t0 = time.time()
        done[cell.name] = run_cell(cell, cfg, threads)
        r = done[cell.name]
        print(f"[{len(done)}/{total[0]}] {cell.name} | {r['layers']} layers x {r['width']} | accuracy "
              f"{100 * r['accuracy']:.1f}% | gold log-prob {r['gold_logprob']:.4f} | {(time.time() - t0) / 60:.1f} min "
              f"| {(time.time() - started) / 60:.1f} min in all", flush=True)

    rest = [c for c in todo if c.name != "dense"]
    if len(rest) < len(todo):
        one(todo[0], cores)
    rest += [c for c in snapshot_cells(cfg) if not cfg.cell or c.name in cfg.cell.split(",")]
    total[0] = len(done) + len(rest)
    rest.sort(key=lambda c: (bool(c.needs), -c.budget * (2 if c.method in ("ptl", "ptlc") else 1), c.method == "dense",
                             c.name))
    with ThreadPoolExecutor(1 if cfg.in_process else max(1, min(cfg.jobs, len(rest)))) as pool:
        for c in rest:
            futures[c.name] = pool.submit(one, c, max(1, cores // cfg.jobs))
        for f in list(futures.values()):
            try:
                f.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # cells already running finish; their work is kept
                raise
    return done


def main(cfg: Config) -> dict:
    todo = model_cells(cfg)
    if cfg.cell:
        names, wanted = [c.name for c in todo], cfg.cell.split(",")
        unknown = [w for w in wanted if w not in names and not w.startswith("dense-step")]
        if unknown:
            raise ValueError(f"--cell {','.join(unknown)}: no such cell; the cells are {', '.join(names)}, "
                             "dense-step0, dense-stepN")
        needed = {c.needs for c in todo if c.name in wanted}
        todo = [c for c in todo if c.name in ("dense", *wanted, *needed)]
    if cfg.print:
        for c in todo:
            for cmd in c.train:
                print(f"# {c.name}\n{shlex.join(cmd)}")
        print(f"# then every model: {shlex.join(evaluate_command(cfg, Path('MODEL'), Path('OUT.json'), cfg.eval_n))}")
        return {}
    done = run_all(cfg, todo)
    if cfg.cell:
        return {"cells": done}
    import gradual_stats

    return {"cells": done, **gradual_stats.main(gradual_stats.Config(results=cfg.results))}


if __name__ == "__main__":
    run_cli(main, Config)
