"""Recovery by continual pre-training (paper Section 2.2, Algorithm 1 line 9): a hand-written training loop.

Texts "Question: q Answer: a" + EOS are packed into blocks of --max-length tokens with labels = inputs, and
the loss is the mean over every label token of the global batch: the sum of token losses over micro-batches
and ranks divided by their total count. AdamW, linear warmup then cosine decay, gradient clipping,
accumulation = global batch / (micro batch x world), no gradient sync before the last micro-step,
non-reentrant gradient checkpointing (--grad-ckpt), bf16 autocast on CUDA and fp32 on CPU. DDP by default;
--fsdp shards every decoder layer with FSDP2 (`fully_shard`) so that 7-9B models fit with AdamW state.

The choices made here against the paper and the authors' LLaMA-Factory yamls, and why: docs/recovery.md.

    python recover.py --data offline --samples 512 --max-length 256 --max-steps 20 --out /tmp/cpt   # CPU
    torchrun --nproc_per_node 8 recover.py --model out/llama3/round_3 --out out/llama3/round_3_cpt \\
        --data AI-MO/NuminaMath-CoT,meta-math/MetaMathQA --samples 100000 --fsdp --grad-ckpt
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from data import check_sources, load_texts, pad_id
from fast import checkpointing, chunked_token_loss_sum, head_outside
from models import DEFAULT_MODEL, load_model
from ptl_common import (Dist, all_reduce_, check_out, check_ranges, cleanup_dist, flag, print0, run_cli, same_path,
                        setup_dist)
from trainer import (autocast_for, end_step, finished, grad_sync, load_moments, moments_of, reload, resume, save_final,
                     save_moments, save_weights, set_moments, token_loss_sum, wrap)

# ----------------------------------------------------------------------------- pure functions


def pack(docs: list[list[int]], block: int, pad_id: int) -> dict:
    """Concatenate documents (token lists, each ending in EOS) and cut the stream into rows of `block` tokens;
    the last row is right-padded. labels = input_ids, -100 on padding only, so EOS separators are learned
    even when pad_id == eos_id.  -> {input_ids, labels, attention_mask}, each (N, block)"""
    stream = torch.tensor(list(itertools.chain.from_iterable(docs)), dtype=torch.long)
    n = math.ceil(len(stream) / block)
    ids = torch.full((n * block,), pad_id, dtype=torch.long)
    ids[: len(stream)] = stream
    mask = (torch.arange(n * block) < len(stream)).long()
    return {"input_ids": ids.view(n, block), "labels": ids.masked_fill(mask == 0, -100).view(n, block),
            "attention_mask": mask.view(n, block)}


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """lr of update `step` (0-based): peak * (step + 1) / warmup while step < warmup, then
    peak * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2, which reaches 0 after the last update."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def window_steps(window: str, total: int) -> tuple[int, int]:
    """Steps [first, stop) of window 't/T' of a run of `total` steps: floor((t - 1) total / T) .. floor(t total / T);
    '' is the whole run."""
    if not window:
        return 0, total
    try:
        t, T = (int(x) for x in window.split("/"))
    except ValueError:
        raise ValueError(f"--window {window!r}: give t/T, e.g. 2/5") from None
    if not 1 <= t <= T:
        raise ValueError(f"--window {window}: need 1 <= t <= T")
    if T > total:
        raise ValueError(f"--window {window}: the run has {total} steps, fewer than {T} windows")
    return (t - 1) * total // T, t * total // T


def step_blocks(step: int, n: int, g: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the g block indices of optimizer step `step`, which of them are trained on): a pure function of the seed
    and the step. Epoch e visits the n blocks in the order randperm(n, seed + e), g at a time; its last, partial
    batch is filled up with blocks from the start of that order that carry no labels (context only), so every step
    has g blocks on every rank and every block is trained on once per epoch."""
    epoch, s = divmod(step, math.ceil(n / g))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    idx = order[s * g : (s + 1) * g]
    return torch.cat([idx, order[: g - len(idx)]]), torch.arange(g) < len(idx)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Config:
    """Continual pre-training on reasoning text: PTL's recovery step (paper Section 2.2)."""
    model: str = flag(DEFAULT_MODEL, "smollm2-135m, a checkpoint dir (e.g. a PTL round) or a hub name")
    data: str = flag("offline", "comma-separated: offline | .jsonl/.parquet | hub names (paper: "
                                "AI-MO/NuminaMath-CoT,meta-math/MetaMathQA)")
    samples: int = flag(0, "texts to train on (0: every row; offline needs a number)")
    data_offset: int = flag(0, "first row of this run's slice of the shuffled data")
    out: str = flag("out/cpt", "final HF checkpoint, metrics.jsonl, checkpoints/")
    max_length: int = flag(1024, "tokens per packed block (paper 1024; released yamls 512)")
    global_batch: int = flag(32, "blocks per optimizer step (paper and yamls: 32)")
    micro_batch: int = flag(2, "blocks per forward on one rank")
    lr: float = flag(8e-6, "peak lr (paper 8e-6; released Llama/Qwen yamls 4e-6)")
    warmup_ratio: float = flag(0.05, "share of the steps with a linear warmup (paper)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping by global norm")
    epochs: int = flag(1, "passes over the data (paper: 1)")
    max_steps: int = flag(0, "optimizer steps (0: epochs over the data)")
    window: str = flag("", "'t/T': train only the t-th of T equal windows of this run's steps (its data, lr schedule "
                           "and warmup stay those of the whole run) and write the AdamW moments to OUT/moments"
                           ".safetensors for the next window (ptl.py --recovery-schedule continuous)")
    grad_ckpt: bool = flag(False, "non-reentrant gradient checkpointing")
    ckpt_policy: Literal["full", "matmuls"] = flag("full", "with --grad-ckpt: full recomputes each decoder layer "
                                                   "in backward; matmuls keeps the matmul and attention outputs and "
                                                   "recomputes only the pointwise ops")
    ce_chunk: int = flag(512, "tokens per chunk of the LM-head cross-entropy, which never holds the whole (tokens x "
                              "vocab) logits (0: the plain head and cross-entropy)")
    fsdp: bool = flag(False, "FSDP2 per decoder layer instead of DDP")
    compile: bool = flag(False, "torch.compile the model's forward (opt-in: minutes of compiling first)")
    save_every: int = flag(0, "steps between resumable checkpoints (0: none)")
    keep_every: int = flag(0, "also keep the weights every N steps as OUT/step_<N>/, a plain HF checkpoint (a "
                              "learning curve)")
    precision: Literal["auto", "fp32", "bf16"] = flag("auto", "matmul precision under fp32 master weights: bf16 "
                                                              "autocast, or fp32; auto = bf16 on CUDA, fp32 on CPU")
    seed: int = flag(0, "which texts are drawn, and the order of the blocks")
    device: str = flag("auto", "auto (CUDA if present), cpu, cuda, ...")

    def __post_init__(self):
        check_ranges(self, positive=("global_batch", "micro_batch", "lr", "epochs", "max_grad_norm"),
                     non_negative=("samples", "data_offset", "max_steps", "save_every", "keep_every", "weight_decay",
                                   "ce_chunk"), unit=("warmup_ratio",))
        self.model = same_path(self.model)
        check_out(self.out, self.model)
        check_sources(self.data, "--data")
        if self.lr > 1:
            raise ValueError(f"--lr {self.lr}: AdamW moves every weight by about lr per step; need <= 1")
        if self.global_batch < 1 or self.micro_batch < 1 or self.max_length < 2 or self.lr <= 0:
            raise ValueError("need --global-batch, --micro-batch >= 1, --max-length >= 2 and --lr > 0")
        if self.keep_every < 0 or self.save_every < 0:
            raise ValueError("need --keep-every >= 0 and --save-every >= 0")
        if self.window:
            window_steps(self.window, 10**9)  # refuses a malformed window now
            if self.fsdp:
                raise ValueError("--window carries the whole AdamW state on; --fsdp shards it: drop --fsdp")
        if self.ckpt_policy != "full" and not self.grad_ckpt:
            raise ValueError(f"--ckpt-policy {self.ckpt_policy} chooses what --grad-ckpt recomputes; add --grad-ckpt")


# May change when a run is resumed: they change speed or memory, not what is computed.
RESUMABLE = {"save_every", "keep_every", "device", "out", "ce_chunk", "compile", "ckpt_policy"}


def packed(tok, texts: list[str], cfg: Config, world: int) -> tuple[dict, dict]:
    """(blocks, fingerprint): `texts` tokenised, each ended by EOS, packed into --max-length blocks (see pack), and
    what identifies them for resuming; refuses data or batch sizes that cannot make one global batch."""
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate packed documents")
    docs = [ids + [tok.eos_token_id] for ids in tok(texts)["input_ids"]]
    data = pack(docs, cfg.max_length, pad_id(tok))
    N, G, M = len(data["input_ids"]), cfg.global_batch, cfg.micro_batch
    if G % (M * world):
        raise ValueError(f"--global-batch {G} must be a multiple of --micro-batch {M} x {world} processes")
    if N < G:
        raise ValueError(f"the data packs into {N} blocks of {cfg.max_length} tokens, fewer than one global batch "
                         f"({G}); use more data, a smaller --global-batch or a shorter --max-length")
    return data, {"blocks": N, "tokens": int(data["attention_mask"].sum()), "config": asdict(cfg)}


def train(model, tok, texts: list[str], cfg: Config, moments: dict | None = None) -> dict:
    """Continual pre-training of `model` on `texts`; the final weights go to cfg.out as an HF checkpoint.

    Call on every rank with the same texts. With a window (--start-step/--stop-step) it trains only those steps of
    the run, starting AdamW from `moments` ({parameter name: its state}; None: fresh). Returns {"model": the trained
    model, unwrapped ("model" is a fresh copy loaded from cfg.out after --fsdp), "steps", "tokens", "loss",
    "time_s", "moments": AdamW's state at the end}. Resumes from cfg.out."""
    d, out = setup_dist(cfg.device), Path(cfg.out)
    data, fingerprint = packed(tok, texts, cfg, d.world)
    N, G, M, W = len(data["input_ids"]), cfg.global_batch, cfg.micro_batch, d.world
    total = cfg.max_steps or cfg.epochs * math.ceil(N / G)  # the whole run's steps: the lr schedule spans them
    first, stop = window_steps(cfg.window, total)
    if (done := finished(out, fingerprint, RESUMABLE)) is not None:
        return {**done, "model": reload(model, out, d), "moments": load_moments(out / "moments.safetensors")}
    warmup = math.ceil(cfg.warmup_ratio * total)
    model.train()
    if cfg.grad_ckpt:  # before wrapping, non-reentrant: works with DDP's no_sync and FSDP2
        checkpointing(model, True, cfg.ckpt_policy)
    if cfg.compile:  # in place (nn.Module.compile): parameter names and the state dict stay as they are
        model.compile()
    net = wrap(model, d, fsdp=cfg.fsdp)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                            fused=True)  # one kernel for all parameters: 5x faster than foreach on CPU
    set_moments(model, opt, moments or {})
    start, elapsed = resume(out, net, opt, fingerprint, RESUMABLE)  # a checkpoint's state replaces the carried moments
    start = max(start, first)
    autocast = autocast_for(cfg.precision, d.device)
    bar = tqdm(total=stop, initial=start, desc="recover", disable=not d.main, leave=False)

    def trained_tokens(step: int) -> int:  # real tokens of the blocks that step trains on
        idx, live = step_blocks(step, N, G, cfg.seed)
        return int(data["attention_mask"][idx[live]].sum())

    t_start, loss = time.time() - elapsed, float("nan")
    tokens = sum(trained_tokens(s) for s in range(first, start))  # trained before a resume
    for step in range(start, stop):
        t0, lr = time.perf_counter(), cosine_lr(step, total, warmup, cfg.lr)
        try:
            loss, gnorm = train_step(net, opt, data, *step_blocks(step, N, G, cfg.seed), lr=lr, cfg=cfg, d=d,
                                     autocast=autocast)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {step + 1}; stopping before the update. The last good checkpoint "
                                     f"(if any) is in {out / 'checkpoints'}; try a lower --lr.") from None
        tokens += trained_tokens(step)
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm,
               "tokens_per_s": trained_tokens(step) / (time.perf_counter() - t0)}
        if cfg.keep_every and (step + 1) % cfg.keep_every == 0 and step + 1 < stop:
            save_weights(out / f"step_{step + 1}", model, net, tok)
        end_step(out, row, f"step {step + 1}/{total} | loss {loss:.4f} | lr {lr:.2e} | grad {gnorm:.3f} | tok/s "
                 f"{row['tokens_per_s']:.0f}", bar, step, stop, cfg.save_every, net, opt, fingerprint, t_start)
    bar.close()
    summary = {"steps": stop - first, "tokens": tokens, "loss": loss, "time_s": time.time() - t_start, "blocks": N,
               "global_batch": G, "accum": G // (M * W), "world": W, "resumed_at": start, "window": [first, stop],
               "schedule_steps": total, "fingerprint": fingerprint}
    carried = moments_of(model, opt)
    if cfg.window and d.main:  # before save_final's summary marks the run done
        out.mkdir(parents=True, exist_ok=True)
        save_moments(out / "moments.safetensors", carried)
    save_final(out, model, net, tok, summary)
    if cfg.grad_ckpt:
        checkpointing(model, False)
    sharded = cfg.fsdp and W > 1
    return {**summary, "model": reload(model, out, d) if sharded else model.eval(), "moments": carried}


def train_step(net, opt, data: dict, idx: torch.Tensor, live: torch.Tensor, *, lr: float, cfg: Config, d: Dist,
               autocast) -> tuple[float, float]:
    """One optimizer step on the global batch `idx` (G block indices; `live` marks those trained on): this rank's
    micro-batches, each rank's gradient of sum(token losses) / (labelled tokens of the whole global batch),
    clipping, AdamW at `lr`. -> (loss, grad norm). A loss that is not finite stops it before the update."""
    M, W = cfg.micro_batch, d.world
    labels = data["labels"][idx].masked_fill(~live[:, None], -100)  # (G, T): fillers carry no labels
    n_tok = (labels[:, 1:] != -100).sum()  # labelled tokens in the whole global batch
    loss_sum, accum = torch.zeros((), device=d.device), len(idx) // (M * W)
    with head_outside(getattr(net, "module", net), cfg.ce_chunk > 0) as (head, cap):  # DDP's module; FSDP2's in place
        for m in range(accum):  # this rank takes every W-th run of M blocks
            j = slice((m * W + d.rank) * M, (m * W + d.rank + 1) * M)
            b = {"input_ids": data["input_ids"][idx[j]].to(d.device), "labels": labels[j].to(d.device),
                 "attention_mask": data["attention_mask"][idx[j]].to(d.device)}
            with grad_sync(net, m == accum - 1), autocast:
                ce = micro_loss_sum(net, b, head, cap, cfg.ce_chunk)
                # DDP and FSDP average gradients over ranks: x W makes the result sum(ce) / n_tok exactly.
                (ce * W / n_tok).backward()
            loss_sum += ce.detach()
    loss = (all_reduce_(loss_sum) / n_tok).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss}")  # train() says where, before any update
    for g in opt.param_groups:
        g["lr"] = lr
    gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)


def micro_loss_sum(net, b: dict, head, cap: float | None, chunk: int) -> torch.Tensor:
    """Sum of the token losses of one micro-batch b; `head` set: the model returns hidden states (head_outside)."""
    mask = None if b["attention_mask"].all() else b["attention_mask"]  # full blocks: SDPA's causal path
    # The output, logits (B, T, V) or hidden states (B, T, d), is freed when this returns: before backward.
    out = net(input_ids=b["input_ids"], attention_mask=mask, use_cache=False).logits
    if head is not None:
        return chunked_token_loss_sum(out, head, b["labels"], chunk, cap)[0]
    return token_loss_sum(out, b["labels"])[0]


def main(cfg: Config) -> dict:
    d = setup_dist(cfg.device)
    model, tok = load_model(cfg.model, dtype="float32", device=d.device)  # fp32 master weights; bf16 autocast on CUDA
    texts = load_texts(cfg.data, n=cfg.samples, seed=cfg.seed, offset=cfg.data_offset)
    result = train(model, tok, texts, cfg)
    print0(f"trained {result['steps']} steps on {result['tokens']} tokens (final loss {result['loss']:.4f}): "
           f"{cfg.out} is a Hugging Face checkpoint (metrics.jsonl beside it)")
    cleanup_dist()
    return {k: v for k, v in result.items() if k not in ("model", "moments")}


if __name__ == "__main__":
    run_cli(main, Config)
