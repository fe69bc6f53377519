"""A measured miniature of Table 1 on this machine: PTL against Prune-Once and ShortGPT on the default model.

    python scripts/mini_table1.py --out out/mini            # about 1 h on 2 CPU cores; re-running resumes
    python scripts/mini_table1.py --out out/mini --step-sizes 0.05,0.2   # and Figure 4 (about 40 min more)
    python scripts/mini_table1.py --out out/mini --print    # the commands, without running them

1. dense: SmolLM2-135M-Instruct after a short continual pre-training (recover.py) on offline chain-of-thought
   arithmetic, so that it has an accuracy to keep (0% before: it never writes a boxed answer).
2. three compressions of that model to the same size (--target-ratio of all parameters; 0.24 is about 30% of
   the non-embedding ones), each with the same recovery data budget, all through ptl.py:
   PTL (neuron rounds of --neuron-step, then --layer-target single-layer rounds, recovery after each round),
   Prune-Once (the same final architecture in one cut, then all of PTL's recovery texts at once), ShortGPT
   (only the lowest-Block-Influence layers, in one cut, then the same recovery texts).
3. evaluate.py on the held-out `offline` problems (never in any training or calibration data: a content-hash
   split, ptl_common.held_out): accuracy with its binomial standard error, parameters, FLOPs per question,
   measured prefill and decode speedup over the dense model (all timed alternately in one process),
   recovery tokens and time; and the per-round curve of the PTL run (Figure 3): OUT/ptl/report.md, rounds.png.
4. --step-sizes: the same PTL run at other neuron steps, --round-samples recovery texts per round (as the paper:
   a smaller step means more rounds and more recovery), evaluated together in OUT/eval_steps.json (Figure 4).

Writes OUT/table.md and OUT/table.json. Hyperparameters are sized for two CPU cores (lr 1e-4 for a 135M model
and a few hundred steps, where the paper uses 8e-6 for 8B models and 100k texts per round).
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptl_common import DEFAULT_MODEL, atomic_write_json, finished_rounds, human, load_record, parse_config  # noqa: E402


@dataclass
class Config:
    """Miniature Table 1: dense CPT, then PTL, Prune-Once and ShortGPT at one size and one recovery budget."""
    out: str = "out/mini"
    model: str = DEFAULT_MODEL
    dense_samples: int = field(default=640, metadata={"help": "offline texts of the dense model's continual pre-training"})
    target_ratio: float = field(default=0.24, metadata={"help": "fraction of all parameters to remove (0.24: ~30%% of non-embedding)"})
    layer_target: int = field(default=3, metadata={"help": "layers PTL and Prune-Once remove (within --target-ratio)"})
    neuron_step: float = field(default=0.1, metadata={"help": "PTL's neurons per round, fraction of the width"})
    round_samples: int = field(default=160, metadata={"help": "recovery texts per PTL round; the baselines get rounds x this"})
    lr: float = 1e-4
    max_length: int = 256
    global_batch: int = 8
    micro_batch: int = 4
    calib_samples: int = 64
    eval_limit: int = field(default=400, metadata={"help": "held-out offline problems in the final evaluation"})
    round_eval_limit: int = field(default=200, metadata={"help": "held-out problems per PTL round (the curve); 0: no curve"})
    max_new_tokens: int = 192
    eval_batch: int = field(default=64, metadata={"help": "questions per generate batch (decoding on CPU is memory-bound: wide is cheap)"})
    step_sizes: str = field(default="", metadata={
        "help": "Figure 4: more PTL runs with these --neuron-step values, e.g. 0.05,0.2 (--round-samples texts per round)"})
    print: bool = field(default=False, metadata={"help": "print the commands instead of running them"})

    def step_list(self) -> list[str]:
        return [x for x in self.step_sizes.split(",") if x]


def last_round(out: Path, name: str) -> Path:
    """The last finished round of the ptl.py run OUT/name."""
    return out / name / f"round_{finished_rounds(out / name)[-1]}"


def commands(cfg: Config, finished: set[str]) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, the file it leaves when finished, or None) of every step whose inputs are ready, in order.
    A step that needs the rounds of a PTL run (the baselines' recovery budget is PTL's rounds x --round-samples;
    the evaluation takes each run's last round) appears once that run is in `finished`."""
    out, py = Path(cfg.out), [sys.executable]
    train = (f"--max-length {cfg.max_length} --global-batch {cfg.global_batch} --micro-batch {cfg.micro_batch} "
             f"--lr {cfg.lr}")
    size = f"--target-ratio {cfg.target_ratio} --calib-samples {cfg.calib_samples} --max-length {cfg.max_length}"

    def ptl(name: str, flags: str, samples: int) -> tuple[str, list[str], None]:
        # --seed 1 for recovery: a different shuffle of the offline stream than the dense model's (seed 0)
        cmd = [*py, str(ROOT / "ptl.py"), "--model", str(out / "dense"), "--out", str(out / name), *size.split(),
               *shlex.split(flags), "--recovery", "cpt", "--cpt-flags", f"--data offline --samples {samples} --seed 1 {train}"]
        return name, cmd, None  # ptl.py resumes by itself, and returns at once when it is done

    def evaluate(models: list[Path], to: str) -> tuple[str, list[str], Path]:
        return to, [*py, str(ROOT / "evaluate.py"), "--model", str(out / "dense"), "--compare", ",".join(map(str, models)),
                    "--tasks", "offline", "--limit", str(cfg.eval_limit), "--max-new-tokens", str(cfg.max_new_tokens),
                    "--batch-size", str(cfg.eval_batch), "--out", str(out / f"{to}.json")], out / f"{to}.json"

    steps = [("dense", [*py, str(ROOT / "recover.py"), "--model", cfg.model, "--data", "offline", "--samples",
                        str(cfg.dense_samples), *train.split(), "--out", str(out / "dense")], out / "dense" / "train_summary.json")]
    curve = (["--eval-every-round", "--eval-flags", f"--tasks offline --limit {cfg.round_eval_limit} "
              f"--max-new-tokens {cfg.max_new_tokens} --batch-size {cfg.eval_batch}"] if cfg.round_eval_limit else [])
    name, cmd, done = ptl("ptl", f"--layer-target {cfg.layer_target} --neuron-step {cfg.neuron_step}", cfg.round_samples)
    steps.append((name, cmd + curve, done))
    if "ptl" in finished:
        budget = len(finished_rounds(out / "ptl")) * cfg.round_samples
        steps.append(ptl("prune-once", f"--baseline prune-once --layer-target {cfg.layer_target} --neuron-step "
                         f"{cfg.neuron_step}", budget))
        steps.append(ptl("shortgpt", "--baseline shortgpt", budget))
    if {"prune-once", "shortgpt"} <= finished:
        steps.append(evaluate([last_round(out, n) for n in ("ptl", "prune-once", "shortgpt")], "eval"))
        if cfg.round_eval_limit:
            steps.append(("curve", [*py, str(ROOT / "evaluate.py"), "--report", str(out / "ptl")], out / "ptl" / "report.md"))
    step_runs = [f"step-{x}" for x in cfg.step_list()]
    steps += [ptl(n, f"--layer-target {cfg.layer_target} --neuron-step {x}", cfg.round_samples)
              for n, x in zip(step_runs, cfg.step_list())]
    if step_runs and set(step_runs) <= finished:
        steps.append(evaluate([last_round(out, n) for n in step_runs], "eval_steps"))
    return steps


def run(cfg: Config) -> None:
    """Run every step not finished yet; each tool resumes its own partial work."""
    finished: set[str] = set()
    while todo := [s for s in commands(cfg, finished) if s[0] not in finished]:
        name, cmd, done = todo[0]
        if done is None or not done.exists():
            print(f"\n[{name}] {shlex.join(cmd)}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
        finished.add(name)


def stderr(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n questions: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n)


def measure(ev: dict, label: str, path: Path, run_dir: Path | None, dense: Path) -> dict:
    """One row: a model's accuracy, size and speed from an evaluate.py --compare result (against `dense`), and its
    run's recovery."""
    acc, speed = ev[str(path)]["offline"], ev["speed"][str(path)]
    dense_acc, dense_params = ev[str(dense)]["offline"]["accuracy"], ev["speed"][str(dense)]["params"]
    recs = [load_record(run_dir / f"round_{t}") for t in finished_rounds(run_dir)] if run_dir else []
    parts = [v for r in recs for v in r.get("recovery", {}).values()]
    conf = json.loads((path / "config.json").read_text())
    return {"model": label, "rounds": len(recs), "layers": conf["num_hidden_layers"], "width": conf["intermediate_size"],
            "params": speed["params"]["total"], "non_embedding": speed["params"]["non_embedding"],
            "removed_non_embedding": 1 - speed["params"]["non_embedding"] / dense_params["non_embedding"],
            "accuracy": acc["accuracy"], "n": acc["n"], "stderr": stderr(acc["accuracy"], acc["n"]),
            "retention": acc["accuracy"] / dense_acc if dense_acc else None,
            "gflops_per_question": acc["flops_per_question"] / 1e9, "flop_ratio_128": speed.get("flop_ratio_128", 1.0),
            "prefill_speedup": speed.get("prefill_speedup", 1.0), "decode_speedup": speed.get("decode_speedup", 1.0),
            "recovery_tokens": sum(p["tokens"] for p in parts), "recovery_s": sum(p["time_s"] for p in parts)}


def markdown(rows: list[dict]) -> str:
    head = ["model", "rounds", "layers", "FFN width", "params", "non-emb. removed", "accuracy (%) ± s.e.", "retention",
            "GFLOPs/question", "FLOP ratio", "prefill speedup", "decode speedup", "recovery tokens", "recovery time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], str(r["rounds"]), str(r["layers"]), str(r["width"]), human(r["params"]),
            f"{r['removed_non_embedding']:.1%}", f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}",
            f"{r['retention']:.2f}" if r["retention"] is not None else "—", f"{r['gflops_per_question']:.1f}",
            f"{r['flop_ratio_128']:.2f}x", f"{r['prefill_speedup']:.2f}x", f"{r['decode_speedup']:.2f}x",
            human(r["recovery_tokens"]) if r["recovery_tokens"] else "—",
            f"{r['recovery_s'] / 60:.1f} min" if r["recovery_s"] else "—"]) + " |")
    return "\n".join(lines) + "\n"


def table(cfg: Config) -> dict:
    """OUT/table.md and table.json: Table 1 from eval.json, and with --step-sizes Figure 4 from eval_steps.json."""
    out = Path(cfg.out)
    ev = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "dense" / "train_summary.json").read_text())
    dense = out / "dense"
    rows = [measure(ev, "dense", dense, None, dense)]
    rows += [measure(ev, label, last_round(out, name), out / name, dense)
             for label, name in (("PTL", "ptl"), ("Prune-Once", "prune-once"), ("ShortGPT", "shortgpt"))]
    md = (f"Held-out offline arithmetic, n = {rows[0]['n']} per model, greedy. Dense = {cfg.model} after "
          f"{human(summary['tokens'])} tokens ({summary['time_s'] / 60:.1f} min) of continual pre-training.\n\n"
          + markdown(rows))
    steps = []
    if cfg.step_list():  # Figure 4: the same PTL at other neuron steps, each evaluated beside the dense model again
        ev_s = json.loads((out / "eval_steps.json").read_text())
        steps = [measure(ev_s, f"PTL, step {x}", last_round(out, f"step-{x}"), out / f"step-{x}", dense)
                 for x in cfg.step_list()]
        md += (f"\nFigure 4, neuron step size ({cfg.round_samples} recovery texts per round; the Table 1 PTL run above "
               f"used step {cfg.neuron_step}):\n\n" + markdown(steps))
    (out / "table.md").write_text(md)
    atomic_write_json(out / "table.json", {"config": vars(cfg), "rows": rows, "step_rows": steps})
    return {"rows": rows, "step_rows": steps, "markdown": md}


def main(cfg: Config) -> dict:
    if cfg.print:
        for name, cmd, _ in commands(cfg, set()):
            print(f"# {name}\n{shlex.join(cmd)}")
        print("# then prune-once and shortgpt with PTL's number of rounds x --round-samples texts, and evaluate.py")
        return {}
    run(cfg)
    res = table(cfg)
    print("\n" + res["markdown"])
    return res


if __name__ == "__main__":
    main(parse_config(Config))
