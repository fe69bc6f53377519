"""Recovery by continual pre-training (paper Section 2.2, Algorithm 1 line 9): a hand-written training loop.

Texts "Question: q Answer: a" + EOS are packed into blocks of --max-length tokens with labels = inputs, and
the loss is the mean over every label token of the global batch: the sum of token losses over micro-batches
and ranks divided by their total count. AdamW, linear warmup then cosine decay, gradient clipping,
accumulation = global batch / (micro batch x world), no gradient sync before the last micro-step,
non-reentrant gradient checkpointing (--grad-ckpt), bf16 autocast on CUDA and fp32 on CPU. DDP by default;
--fsdp shards every decoder layer with FSDP2 (`fully_shard`) so that 7-9B models fit with AdamW state.

Choices, against the paper and the authors' LLaMA-Factory yamls:
1. Defaults are the paper's text: lr 8e-6, global batch 32, 1024 tokens, 1 epoch, cosine, warmup 0.05. The
   released yamls use lr 4e-6 (Llama, Qwen; 8e-6 for Gemma2) and cutoff_len 512.
2. Each document starts as the tokenizer starts it (BOS where the model has one); LLaMA-Factory's pt stage
   adds BOS only for Gemma. Packed documents see each other, as in LLaMA-Factory's pt stage.
3. The last partial block is kept (padded; padding has no labels), and so is an epoch's last partial global
   batch (filled up with label-free copies of other blocks): every token is trained on once per epoch, and
   every step has --global-batch blocks of one shape on every rank.
4. FSDP2 stands in for DeepSpeed ZeRO-2 (FSDP2 also shards the parameters, like ZeRO-3).

    python recover.py --data offline --samples 512 --max-length 256 --max-steps 20 --out /tmp/cpt   # CPU
    torchrun --nproc_per_node 8 recover.py --model out/llama3/round_3 --out out/llama3/round_3_cpt \\
        --data AI-MO/NuminaMath-CoT,meta-math/MetaMathQA --samples 100000 --fsdp --grad-ckpt
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from tqdm import tqdm

from ptl_common import (all_reduce_, atomic_dir, atomic_write_json, barrier, check_out, check_ranges, cleanup_dist,
                        Dist, flag, is_main, nonfinite, print0, run_cli, setup_dist, sha256)
from data import load_texts, pad_id
from models import DEFAULT_MODEL, load_model

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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labelled positions t of -log p(x_{t+1} | x_<=t), their count). logits (B, T, V), labels (B, T)"""
    y = F.pad(labels[:, 1:], (0, 1), value=-100)  # shift the labels, not the logits: no (B, T, V) copy
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
    return ce, (y != -100).sum()


class ChunkedLinearCE(torch.autograd.Function):
    """sum_t CE(cap(h_t W^T), y_t) over rows t with y_t != -100, a chunk of rows at a time: the (rows x vocab)
    logits of one chunk exist at once, never all of them. Each chunk's gradients are taken in the forward, where its
    logits are at hand: dL/dz = softmax(z) - onehot(y) (times 1 - tanh^2 under Gemma-2's soft-cap z = c tanh(z'/c)),
    dL/dh = dz W, dL/dW = dz^T h; backward only scales them. h (N, d), W (V, d), y (N,)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, chunk: int, cap: float | None):
        Wc = W.to(h.dtype)  # under bf16 autocast h is bf16: the head's matmuls run in bf16, as a plain head's do
        loss, grad_h, grad_W = h.new_zeros((), dtype=torch.float32), torch.empty_like(h), torch.zeros_like(W)
        for s in range(0, len(h), chunk):
            hc, yc = h[s : s + chunk], y[s : s + chunk]
            z = (hc @ Wc.t()).float()  # (n, V): the only logits in memory
            if cap:
                t = torch.tanh(z / cap)
                z = cap * t
            dead, yl = yc == -100, yc.clamp(min=0)[:, None]
            lse = z.logsumexp(-1)
            loss += (lse - z.gather(1, yl)[:, 0]).masked_fill_(dead, 0).sum()
            dz = z.sub_(lse[:, None]).exp_().scatter_add_(1, yl, -torch.ones_like(lse[:, None]))  # softmax - onehot
            dz.masked_fill_(dead[:, None], 0)
            if cap:
                dz.mul_(1 - t * t)
            dz = dz.to(h.dtype)
            grad_h[s : s + chunk] = dz @ Wc
            if grad_W.dtype == dz.dtype:
                grad_W.addmm_(dz.t(), hc)  # accumulated in place: no (V, d) temporary per chunk
            else:
                grad_W += (dz.t() @ hc).to(W.dtype)
        ctx.save_for_backward(grad_h, grad_W)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grad_h, grad_W = ctx.saved_tensors  # used once: scaled in place, no second (V, d) tensor
        return grad_h.mul_(g), grad_W.mul_(g), None, None, None


def chunked_token_loss_sum(h: torch.Tensor, head, labels: torch.Tensor, chunk: int,
                           cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss_sum from the final hidden states h (B, T, d) and the LM head, without the (B, T, V) logits."""
    y = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    return ChunkedLinearCE.apply(h.flatten(0, 1), head.weight, y, chunk, cap), (y != -100).sum()


@contextmanager
def head_outside(model, on: bool = True):
    """Within, model(...).logits are the final hidden states (B, T, d): the LM head's matmul and Gemma-2's final
    soft-cap leave the forward for chunked_token_loss_sum. -> (head, soft-cap or None); (None, None) when off."""
    if not on:
        yield None, None
        return
    head, conf = model.get_output_embeddings(), model.config
    cap = getattr(conf, "final_logit_softcapping", None)
    head.forward = lambda x: x  # an instance attribute: the state dict and DDP's parameters stay as they are
    if cap is not None:
        conf.final_logit_softcapping = None
    try:
        yield head, cap
    finally:
        del head.forward
        if cap is not None:
            conf.final_logit_softcapping = cap


# ----------------------------------------------------------------------------- distribution and state


def wrap(model, d: Dist, *, fsdp: bool = False):
    """DDP (or, with fsdp, FSDP2 per decoder layer) under torchrun; the model itself in one process."""
    if d.world == 1:
        return model
    if not fsdp:
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():  # _no_split_modules: HF's list of decoder-layer classes
        if type(m).__name__ in model._no_split_modules:
            fully_shard(m)
    return fully_shard(model)


_aten = torch.ops.aten
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
             _aten._scaled_dot_product_flash_attention_for_cpu.default,  # SDPA's CPU kernel; then CUDA's three
             _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
             _aten._scaled_dot_product_cudnn_attention.default}


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep the outputs of matmuls and fused attention, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing(model, on: bool, policy: str = "full") -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer, on or off. policy "full" recomputes
    a layer's whole forward in backward; "matmuls" keeps what its matmuls and attention return and recomputes only
    the pointwise ops between them (norms, rotary, activation, residual adds), so no matmul runs twice (PyTorch's
    selective activation checkpointing). transformers 5.23 renamed
    gradient_checkpointing_* to activation_checkpointing_*; older 5.x has only the first."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        kw = {"use_reentrant": False}
        if policy == "matmuls":
            kw["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
        getattr(model, f"{name}_checkpointing_enable")(kw)
    else:
        getattr(model, f"{name}_checkpointing_disable")()


@contextmanager
def grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step; wraps forward *and* backward."""
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU


def check_weights(net, out: Path) -> None:
    """Stop (every rank alike) before anything is saved when an update left a weight NaN or inf: the loss that
    the NaN guard reads was finite, but the update after it can still overflow the weights."""
    bad = nonfinite(net)
    if all_reduce_(torch.tensor(float(len(bad)), device=next(net.parameters()).device)).item():
        raise FloatingPointError(f"weights are not finite after the last update{f' ({bad[0]}, ...)' if bad else ''}; "
                                 f"nothing was saved over the last good checkpoint (if any, in {out / 'checkpoints'}); "
                                 "try a lower --lr")


def save_state(path: Path, model, opt, step: int, extra: dict) -> None:
    """A resumable checkpoint: model, optimizer, step (the data position: the block order is a function of
    seed and epoch) and every rank's RNG state, written by rank 0 into a temporary dir, then renamed."""
    check_weights(model, path.parent.parent)
    msd, osd = get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng)
    if is_main():
        with atomic_dir(path) as tmp:
            torch.save({"model": msd, "optim": osd, "step": step, "rng": rngs, **extra}, tmp / "state.pt")
        for old in path.parent.glob("step_*"):  # keep only the newest
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_state(path: Path, model, opt) -> dict:
    """Restore a save_state checkpoint on every rank (rank 0 reads it and broadcasts)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False) if is_main() else {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, state.get("model", {}), options=opts)
    set_optimizer_state_dict(model, opt, state.get("optim", {}), options=opts)
    meta = [{k: v for k, v in state.items() if k not in ("model", "optim")}]
    if dist.is_initialized():
        dist.broadcast_object_list(meta, src=0)
    rng = meta[0]["rng"][dist.get_rank() if dist.is_initialized() else 0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta[0]


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
        check_out(self.out, self.model)
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
    if (done := finished(out, fingerprint)) is not None:
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
    start, elapsed = resume(out, net, opt, fingerprint)  # a checkpoint's state replaces the carried moments
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
        if d.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.write(f"step {step + 1}/{total} | loss {loss:.4f} | lr {lr:.2e} | grad {gnorm:.3f} | tok/s "
                      f"{row['tokens_per_s']:.0f}")
        if cfg.keep_every and (step + 1) % cfg.keep_every == 0 and step + 1 < stop:
            save_weights(out / f"step_{step + 1}", model, net, tok)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
            save_state(out / "checkpoints" / f"step_{step + 1}", net, opt, step + 1,
                       {**fingerprint, "elapsed": time.time() - t_start})
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


def finished(out: Path, fingerprint: dict, resumable: set = RESUMABLE) -> dict | None:
    """The summary of a run that OUT holds, finished with the same data and settings (those in `resumable` may
    differ); None when OUT holds no finished run. One made with other settings or data is refused, never
    silently taken as done."""
    path = out / "train_summary.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    was = old.get("fingerprint", {})
    new_cfg = {k: v for k, v in fingerprint["config"].items() if k not in resumable}
    diff = {k: (was.get("config", {}).get(k), v) for k, v in new_cfg.items() if was.get("config", {}).get(k) != v}
    if diff or (was.get("blocks"), was.get("tokens")) != (fingerprint["blocks"], fingerprint["tokens"]):
        raise ValueError(f"{out} holds a finished run made with other settings {diff} (old, new) or other data: "
                         "use another --out, or delete it to train again")
    damaged = [n for n, h in old.get("checksums", {}).items() if not (out / n).is_file() or sha256(out / n) != h]
    if damaged:
        raise ValueError(f"{out} holds this run, finished, but {', '.join(damaged)} is not what it wrote (missing "
                         "or changed since): delete OUT to train again")
    print0(f"{out} holds this run, finished ({old['steps']} steps): nothing to do")
    return old


def resume(out: Path, net, opt, fingerprint: dict, resumable: set = RESUMABLE) -> tuple[int, float]:
    """(step to start from, seconds trained before): the newest checkpoint's, after checking it was made with
    the same data and settings; metrics.jsonl is cut back to it so a resumed run logs what an unbroken one would."""
    done = sorted((int(p.name.split("_")[1]), p) for p in (out / "checkpoints").glob("step_*")
                  if (p / "state.pt").exists())
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".step_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if not done:
        if is_main():
            (out / "metrics.jsonl").unlink(missing_ok=True)
        barrier()
        return 0, 0.0
    meta = load_state(done[-1][1], net, opt)
    old = {k: v for k, v in meta["config"].items() if k not in resumable}
    new = {k: v for k, v in fingerprint["config"].items() if k not in resumable}
    if (meta["blocks"], meta["tokens"], old) != (fingerprint["blocks"], fingerprint["tokens"], new):
        raise ValueError(f"{out} holds a run with other data or settings; repeat its command to resume, or use "
                         "another --out")
    if is_main() and (out / "metrics.jsonl").exists():
        rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= meta["step"]]
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    barrier()
    return meta["step"], meta["elapsed"]


def moments_of(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state by parameter name: {name: {"step", "exp_avg", "exp_avg_sq"}}, copies (CPU)."""
    return {n: {k: v.detach().cpu().clone() for k, v in opt.state[p].items()}
            for n, p in model.named_parameters() if p in opt.state}


def set_moments(model, opt, moments: dict) -> None:
    """Start AdamW from `moments` (moments_of's form; parameters not named start fresh)."""
    for n, p in model.named_parameters():
        if n in moments:
            opt.state[p] = {k: v.to(p.device).clone() for k, v in moments[n].items()}


def flat_moments(moments: dict) -> dict[str, torch.Tensor]:
    """moments_of's dict as flat tensors for safetensors: NAME::step, NAME::exp_avg, NAME::exp_avg_sq."""
    return {f"{n}::{k}": v.contiguous() for n, st in moments.items() for k, v in st.items()}


def save_moments(path: Path, moments: dict) -> None:
    """moments_of's dict as one safetensors file, written to a temporary file, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(flat_moments(moments), str(tmp))
    os.replace(tmp, path)


def load_moments(path: Path) -> dict | None:
    """A save_moments (or flat_moments) file as moments_of's dict; None when there is none."""
    if not path.exists():
        return None
    moments: dict = {}
    for key, v in load_file(str(path)).items():
        name, k = key.rsplit("::", 1)
        moments.setdefault(name, {})[k] = v
    return moments


def autocast_for(precision: str, device: torch.device):
    """The autocast context of --precision: bf16 matmuls under fp32 master weights, or plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def save_weights(path: Path, model, net, tok) -> None:
    """The current weights as a plain HF checkpoint at `path` (rank 0 writes a temporary dir, then renames it)."""
    sd = get_model_state_dict(net, options=FULL)  # gathers FSDP shards; a no-op copy otherwise
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: keep the first name only
        if id(p) in seen:
            sd.pop(name, None)
        seen.add(id(p))
    if is_main():
        shutil.rmtree(path, ignore_errors=True)  # a resumed run rewrites the snapshot it had written
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=sd)
            tok.save_pretrained(tmp)
    barrier()


def save_final(out: Path, model, net, tok, summary: dict) -> None:
    """The trained weights as a plain HF checkpoint in OUT, then train_summary.json, which marks the run done.

    Files are written to a temporary dir and moved in with config.json last: OUT never holds a loadable but
    partial checkpoint. The summary lists every file's SHA-256, which finished() checks. The resumable checkpoints
    are deleted afterwards."""
    check_weights(net, out)
    save_weights(out / "final", model, net, tok)
    if is_main():
        sums = {}
        for f in sorted((out / "final").iterdir(), key=lambda p: p.name == "config.json"):
            sums[f.name] = sha256(f)
            os.replace(f, out / f.name)
        (out / "final").rmdir()
        atomic_write_json(out / "train_summary.json", {**summary, "checksums": sums})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    barrier()


def reload(model, out: Path, d: Dist):
    """A fresh, unwrapped copy of the model from OUT (after FSDP2 the trained module holds shards only)."""
    return load_model(str(out), dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=d.device)[0]


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
