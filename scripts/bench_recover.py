"""recover.py against Hugging Face `Trainer` on the same model, packed blocks *in the same order*, batch,
length, lr schedule and number of steps: tokens per second, the loss of both step by step, and peak memory two
ways: the live tensors of the last step (weights, gradients, AdamW state, activations: torch.profiler's memory
events, as torch.cuda.max_memory_allocated counts them on a GPU), and the resident set while training (the peak is
reset once the model and data are loaded), which adds the freed pages the C allocator keeps.
Each trainer runs in its own subprocess, alternated A B A B, so ratios are measured side by side on a noisy machine.
No warmup: HF's schedule spends its first warmup update at lr 0, ours does not.

    python scripts/bench_recover.py                          # SmolLM2-135M, CPU, offline data
    python scripts/bench_recover.py --steps 12 --repeats 3
    python scripts/bench_recover.py --sides ours,plain-ce,compiled,trainer    # recover.py's variants as well
    python scripts/bench_recover.py --profile 2                # where one recover.py step spends its time

Sides: ours (recover.py's defaults: the chunked LM-head cross-entropy), plain-ce (--ce-chunk 0: the whole logits,
as Trainer computes them), compiled (--compile; its first step, which compiles, is left out like every first step),
grad-ckpt (--grad-ckpt: activation checkpointing, which trades a second forward for activation memory),
ckpt-matmuls (--grad-ckpt --ckpt-policy matmuls: recomputes only the pointwise ops), trainer.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from sides import MATMULS, LivePeak, check_sides, emit, held_mb, op_shares, peak_rss_mb, reset_peak_rss, run_sides  # noqa: E402

from models import DEFAULT_MODEL  # noqa: E402
from ptl_common import check_ranges, run_cli  # noqa: E402


@dataclass
class Config:
    """Benchmark recover.py against transformers.Trainer (tokens/s, loss, peak memory)."""
    model: str = DEFAULT_MODEL
    samples: int = 512
    max_length: int = 256
    global_batch: int = 8
    micro_batch: int = 4
    steps: int = 8
    lr: float = 1e-4
    seed: int = 0
    repeats: int = 2
    sides: str = "ours,plain-ce,trainer"
    profile: int = 0  # > 0: instead, profile this many recover.py steps (torch.profiler) after one untimed step
    worker: str = ""  # internal: the side this process runs; it prints JSON

    def __post_init__(self):
        check_ranges(self, positive=("samples", "max_length", "global_batch", "micro_batch", "steps", "lr", "repeats"),
                     non_negative=("profile", "seed"))
        check_sides(self.sides, SIDES)


def pack_texts(tok, cfg: Config) -> tuple[list[str], dict]:
    """(texts, blocks): cfg.samples offline texts, each ended by EOS, packed into cfg.max_length blocks."""
    import recover
    from data import load_texts

    texts = load_texts("offline", n=cfg.samples, seed=0)
    docs = [ids + [tok.eos_token_id] for ids in tok(texts)["input_ids"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # as load_model sets it
    return texts, recover.pack(docs, cfg.max_length, pad)


def blocks(cfg: Config):
    from models import load_model

    model, tok = load_model(cfg.model, dtype="float32", device="cpu")
    return model, tok, *pack_texts(tok, cfg)


def check_data(cfg: Config) -> None:
    """Refuse (exit 2) a run whose data would wrap into a second epoch: the two trainers order an epoch's repeat
    differently, so their losses would part there for a reason that has nothing to do with either trainer."""
    from transformers import AutoTokenizer

    from models import resolve_model

    have = len(pack_texts(AutoTokenizer.from_pretrained(resolve_model(cfg.model)), cfg)[1]["input_ids"])
    need = cfg.steps * cfg.global_batch
    if have < need:
        print(f"bench_recover.py: error: --samples {cfg.samples} packs into {have} blocks of {cfg.max_length} tokens, "
              f"fewer than the {need} that --steps {cfg.steps} x --global-batch {cfg.global_batch} train on; "
              f"use --samples {math.ceil(cfg.samples * need / have)} or more", file=sys.stderr)
        sys.exit(2)


def run_ours(cfg: Config, **flags) -> dict:
    import recover

    model, tok, texts, _ = blocks(cfg)
    loaded = peak_rss_mb(), reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        rc = recover.Config(out=out, max_length=cfg.max_length, global_batch=cfg.global_batch, lr=cfg.lr,
                            micro_batch=cfg.micro_batch, max_steps=cfg.steps, warmup_ratio=0.0, seed=cfg.seed,
                            **flags)
        real, calls, peak = recover.train_step, itertools.count(1), {}

        def step(net, opt, *a, **k):  # the last step runs under LivePeak (and is left out of the timing)
            if next(calls) < cfg.steps:
                return real(net, opt, *a, **k)
            with LivePeak(lambda: held_mb(net, opt)) as p:
                res = real(net, opt, *a, **k)
            peak["mb"] = p.mb
            return res
        recover.train_step = step
        try:
            recover.train(model, tok, texts, rc)
        finally:
            recover.train_step = real
        rows = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [cfg.global_batch * cfg.max_length / r["tokens_per_s"] for r in rows],
            "loss": [r["loss"] for r in rows], "live_peak_mb": peak["mb"], **memory(loaded)}


def memory(loaded: tuple[float, bool]) -> dict:
    """Peak RSS of the loading (model, data) and of the training after it; NaN where it could not be split."""
    return {"load_peak_mb": loaded[0], "train_peak_mb": peak_rss_mb() if loaded[1] else math.nan}


def run_trainer(cfg: Config) -> dict:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tok, _, data = blocks(cfg)
    loaded = peak_rss_mb(), reset_peak_rss()
    order = torch.randperm(len(data["input_ids"]), generator=torch.Generator().manual_seed(cfg.seed))  # recover.py's
    ds = datasets.Dataset.from_dict({k: v[order].tolist() for k, v in data.items()})

    class InOrder(Trainer):  # the blocks in recover.py's order, so the two see the same batches
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)
    times, losses = [], []

    class Clock(TrainerCallback):  # times each step; the last runs under LivePeak (and is left out of the timing)
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **k):
            if state.global_step == cfg.steps - 1:
                self.peak = LivePeak(lambda: held_mb(model, optimizer)).__enter__()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            times.append(time.perf_counter() - self.t)
            if state.global_step == cfg.steps:
                self.peak.__exit__(None, None, None)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.micro_batch,
            gradient_accumulation_steps=cfg.global_batch // cfg.micro_batch, learning_rate=cfg.lr,
            lr_scheduler_type="cosine", warmup_steps=0, max_steps=cfg.steps,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        clock = Clock()
        InOrder(model=model, args=args, train_dataset=ds, callbacks=[clock]).train()
    return {"step_s": times, "loss": losses, "live_peak_mb": clock.peak.mb, **memory(loaded)}


def profile(cfg: Config) -> dict:
    """Self time of each op over cfg.profile steps of recover.py (after one untimed step): the share of matmuls,
    of the LM head's cross-entropy, of AdamW, and of the wall time outside any op."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import recover

    model, tok, texts, _ = blocks(cfg)
    with tempfile.TemporaryDirectory() as out:
        rc = recover.Config(out=out, max_length=cfg.max_length, global_batch=cfg.global_batch, lr=cfg.lr,
                            micro_batch=cfg.micro_batch, max_steps=1 + cfg.profile, warmup_ratio=0.0, seed=cfg.seed)
        state = {}

        def step(*a, **k):  # the first step runs unprofiled; the profiler records the next cfg.profile
            n = state["n"] = state.get("n", 0) + 1
            if n == 2:
                state["prof"], state["t0"] = torch_profile(activities=[ProfilerActivity.CPU]), time.perf_counter()
                state["prof"].__enter__()
            res = real(*a, **k)
            if n == 1 + cfg.profile:
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)
            return res
        real, recover.train_step = recover.train_step, step
        try:
            recover.train(model, tok, texts, rc)
        finally:
            recover.train_step = real
    wall = state["wall"]
    return op_shares(state["prof"], wall, {"matmuls": MATMULS, "AdamW": ("_fused_adamw",)}, rows=15)


def side_runners() -> dict:
    """{side: run(cfg) -> its measurements}: recover.py as it is, its variants, and transformers.Trainer."""
    return {"ours": run_ours, "plain-ce": lambda c: run_ours(c, ce_chunk=0),
            "compiled": lambda c: run_ours(c, compile=True),
            "grad-ckpt": lambda c: run_ours(c, grad_ckpt=True),
            "ckpt-matmuls": lambda c: run_ours(c, grad_ckpt=True, ckpt_policy="matmuls"),
            "trainer": run_trainer}


SIDES = ("ours", "plain-ce", "compiled", "grad-ckpt", "ckpt-matmuls", "trainer")


def main(cfg: Config) -> dict:
    if cfg.profile:
        return profile(cfg)
    if cfg.worker:
        return emit(side_runners()[cfg.worker](cfg))
    check_data(cfg)
    runs = run_sides(__file__, cfg, cfg.sides.split(","))
    tokens = cfg.global_batch * cfg.max_length
    # Timed steps: the first holds one-off costs (allocation, warm caches), the last runs under the profiler.
    res = {side: {"tokens_per_s": tokens / statistics.median(s for r in rs for s in r["step_s"][1:-1]),
                  "runs_tokens_per_s": [tokens / statistics.median(r["step_s"][1:-1]) for r in rs],
                  "loss": rs[0]["loss"], "load_peak_mb": max(r["load_peak_mb"] for r in rs),
                  "train_peak_mb": max(r["train_peak_mb"] for r in rs),
                  "live_peak_mb": max(r["live_peak_mb"] for r in rs)} for side, rs in runs.items()}
    report(res, cfg)
    return res


def report(res: dict, cfg: Config):
    print(f"model {cfg.model} | {cfg.steps} steps of {cfg.global_batch} x {cfg.max_length} tokens "
          f"(micro {cfg.micro_batch}) | {cfg.repeats} runs each, alternated")
    for side, r in res.items():
        print(f"  {side:8s} tokens/s {r['tokens_per_s']:.0f} | live tensors at most {r['live_peak_mb']:.0f} MB | peak "
              f"RSS loading {r['load_peak_mb']:.0f} MB, training {r['train_peak_mb']:.0f} MB | loss per step "
              + " ".join(f"{x:.4f}" for x in r["loss"]))
    t = res.get("trainer")
    for side, o in res.items():
        if t is None or side == "trainer":
            continue
        gap = max(abs(a - b) for a, b in zip(o["loss"], t["loss"]))
        print(f"{side} / Trainer: {o['tokens_per_s'] / t['tokens_per_s']:.3f}x tokens/s (its runs: "
              + ", ".join(f"{x / t['tokens_per_s']:.3f}x" for x in o["runs_tokens_per_s"])
              + f"), live tensors at peak {o['live_peak_mb'] / t['live_peak_mb']:.3f}x, peak RSS while training "
              f"{o['train_peak_mb'] / t['train_peak_mb']:.3f}x, largest loss gap over the steps {gap:.2e}")


if __name__ == "__main__":
    run_cli(main, Config)
