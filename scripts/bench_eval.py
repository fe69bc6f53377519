"""evaluate.py's builtin engine against lm-eval (HF backend) on the same model, GSM8K questions, 8-shot
gsm8k_cot prompt, greedy decoding, generation length and batch size: questions per second of each, and how
often the two agree on the extracted answer. Each engine runs in its own subprocess, alternated A B A B.

    python scripts/bench_eval.py                                   # SmolLM2-135M, 32 GSM8K questions, CPU
    python scripts/bench_eval.py --limit 64 --repeats 1 --data-dir ../shared/data
    python scripts/bench_eval.py --profile 8      # where the builtin engine spends its time, on 8 questions
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sides import MATMULS, emit, op_shares, run_sides  # noqa: E402

from models import DEFAULT_MODEL  # noqa: E402
from ptl_common import check_ranges, import_evaluate, run_cli, unshadow_evaluate  # noqa: E402


@dataclass
class Config:
    """Benchmark evaluate.py's builtin engine against lm-eval (questions/s, answer agreement)."""
    model: str = DEFAULT_MODEL
    data_dir: str = str(ROOT.parent / "shared" / "data")
    limit: int = 32
    batch_size: int = 16
    max_new_tokens: int = 256
    repeats: int = 2
    profile: int = 0  # > 0: instead, profile the builtin engine (torch.profiler) on this many questions
    worker: str = ""  # internal: "builtin" or "lm-eval" runs one side and prints JSON

    def __post_init__(self):
        check_ranges(self, positive=("limit", "batch_size", "max_new_tokens", "repeats"), non_negative=("profile",))
        import_evaluate().benchmark_file("gsm8k", self.data_dir)  # a wrong --data-dir now, in one line


def run(cfg: Config) -> dict:
    from models import load_model

    ev = import_evaluate()
    model, tok = load_model(cfg.model, dtype="float32", device="cpu")
    ecfg = ev.Config(tasks="gsm8k", data_dir=cfg.data_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                     max_new_tokens=cfg.max_new_tokens, engine=cfg.worker, device="cpu")
    t0 = time.perf_counter()
    res = ev.evaluate_model(model, tok, ecfg)["gsm8k"]
    secs = time.perf_counter() - t0
    return {"seconds": secs, "accuracy": res["accuracy"], "samples": res["samples"]}


def profile(cfg: Config) -> dict:
    """Self time of each op over one builtin run: how much goes to matmuls, how much to other ops, and how much of
    the wall time no op accounts for (Python: the decode loop, the stop-string check, the tokenizer)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from models import load_model

    ev = import_evaluate()
    model, tok = load_model(cfg.model, dtype="float32", device="cpu")
    ecfg = ev.Config(tasks="gsm8k", data_dir=cfg.data_dir, limit=cfg.profile, batch_size=cfg.batch_size,
                     max_new_tokens=cfg.max_new_tokens, engine="builtin", device="cpu")
    rows = []  # (rows, tokens) of every forward: how full the decode steps keep the batch
    hook = model.register_forward_pre_hook(lambda m, a, k: rows.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as p:
        t0 = time.perf_counter()
        ev.evaluate_model(model, tok, ecfg)
        wall = time.perf_counter() - t0
    hook.remove()
    steps = [b for b, n in rows if n == 1]
    print(f"{len(rows) - len(steps)} prefills | {len(steps)} decode steps, {sum(steps)} row-tokens: on average "
          f"{sum(steps) / max(len(steps), 1):.1f} rows of {cfg.batch_size} slots")
    return op_shares(p, wall, {"matmuls and attention": MATMULS})


def main(cfg: Config) -> dict:
    if cfg.worker:
        return emit(run(cfg))
    if cfg.profile:
        return profile(cfg)
    ev = import_evaluate()
    runs = run_sides(__file__, cfg, ["builtin", "lm-eval"], env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    ours, theirs = runs["builtin"][0]["samples"], {s["question"]: s for s in runs["lm-eval"][0]["samples"]}
    same_text = sum(s["output"] == theirs[s["question"]]["output"] for s in ours)
    # lm-eval's gsm8k_cot scores "strict-match" and "flexible-extract"; ours takes "The answer is N" when there
    # is one (strict) and else the last number (flexible): compare with whichever of theirs applies.
    agree = 0
    for s in ours:
        f = theirs[s["question"]]["filtered"]
        ref = f["strict-match"] if f["strict-match"] != "[invalid]" else f["flexible-extract"]
        agree += s["pred"] == (None if ref == "[invalid]" else ev._number(ref))
    q = {k: cfg.limit / statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    n = len(ours)
    print(f"model {cfg.model} | GSM8K first {n} questions, 8-shot gsm8k_cot, greedy, {cfg.max_new_tokens} new "
          f"tokens max, batch {cfg.batch_size} | {cfg.repeats} runs each, alternated")
    for k, rs in runs.items():
        print(f"  {k:8s} questions/s {q[k]:.3f} | accuracy {rs[0]['accuracy']:.3f}")
    pairs = [t["seconds"] / b["seconds"] for b, t in zip(runs["builtin"], runs["lm-eval"])]  # run i of each, in turn
    print(f"builtin / lm-eval: {q['builtin'] / q['lm-eval']:.2f}x questions/s (each pair of runs: "
          + ", ".join(f"{x:.2f}x" for x in pairs) + ") | identical generations "
          f"{same_text}/{n} | "
          f"same extracted answer {agree}/{n} ({agree / n:.1%})")
    return {"speedup": q["builtin"] / q["lm-eval"], "same_text": same_text, "agree": agree, "n": n}


if __name__ == "__main__":
    unshadow_evaluate()
    run_cli(main, Config)
