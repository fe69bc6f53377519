"""The training plumbing that continual pre-training (recover.py) and GRPO (grpo.py) share: the loss, DDP / FSDP2
wrapping and gradient sync, resumable checkpoints with one settings check, the per-step metrics and save-every
skeleton, the final checkpoint with its checksums, and AdamW's moments carried from one run to the next.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from models import load_model
from ptl_common import (Dist, all_reduce_, atomic_dir, atomic_write_json, barrier, decoder_layers, ffn, is_main,
                        nonfinite, print0, settings_changed, sha256)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labelled positions t of -log p(x_{t+1} | x_<=t), their count). logits (B, T, V), labels (B, T)"""
    y = F.pad(labels[:, 1:], (0, 1), value=-100)  # shift the labels, not the logits: no (B, T, V) copy
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
    return ce, (y != -100).sum()


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
    state, err = {}, [None]
    if is_main():
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated or overwritten since it was written
            err = [f"{path / 'state.pt'} is damaged ({e}); delete {path} to resume from the start instead"]
    if dist.is_initialized():  # every rank stops, not only the one that read it (the others would wait forever)
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise ValueError(err[0])
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


def finished(out: Path, fingerprint: dict, resumable: set) -> dict | None:
    """The summary of a run that OUT holds, finished with the same data and settings (those in `resumable` may
    differ); None when OUT holds no finished run. One made with other settings or data is refused, never
    silently taken as done."""
    path = out / "train_summary.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    was = old.get("fingerprint", {})
    diff = settings_changed(was.get("config", {}), fingerprint["config"], resumable)
    if diff or (was.get("blocks"), was.get("tokens")) != (fingerprint["blocks"], fingerprint["tokens"]):
        raise ValueError(f"{out} holds a finished run made with other settings {diff} (old, new) or other data: "
                         "use another --out, or delete it to train again")
    damaged = [n for n, h in old.get("checksums", {}).items() if not (out / n).is_file() or sha256(out / n) != h]
    if damaged:
        raise ValueError(f"{out} holds this run, finished, but {', '.join(damaged)} is not what it wrote (missing "
                         "or changed since): delete OUT to train again")
    print0(f"{out} holds this run, finished ({old['steps']} steps): nothing to do")
    return old


def resume(out: Path, net, opt, fingerprint: dict, resumable: set) -> tuple[int, float]:
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
    diff = settings_changed(meta["config"], fingerprint["config"], resumable)
    if diff or (meta["blocks"], meta["tokens"]) != (fingerprint["blocks"], fingerprint["tokens"]):
        raise ValueError(f"{out} holds a run with other data or settings {diff} (old, new); repeat its command to "
                         "resume, or use another --out")
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


def end_step(out: Path, row: dict, line: str, bar, step: int, stop: int, save_every: int, net, opt,
             fingerprint: dict, t_start: float) -> None:
    """After optimizer step `step` (0-based) of a run that ends at `stop`: rank 0 appends `row` to metrics.jsonl and
    prints `line`; every `save_every` steps but the last, a resumable checkpoint."""
    if is_main():
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.write(line)
    if save_every and (step + 1) % save_every == 0 and step + 1 < stop:
        save_state(out / "checkpoints" / f"step_{step + 1}", net, opt, step + 1,
                   {**fingerprint, "elapsed": time.time() - t_start})


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


@torch.no_grad()
def carry_moments(moments: dict, model, before: dict, after: dict) -> dict:
    """AdamW's moments after a cut, for the cut model: a kept layer's renumbered, a kept neuron's rows of gate/up
    (and columns of down) kept, a removed unit's gone. moments: {parameter name before the cut: {"step",
    "exp_avg", "exp_avg_sq"}}; before, after: the loop's states (ptl.LoopState), whose kept_layers and kept_neurons
    hold dense indices."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    rel = {id(m): n for n, m in layers[0].named_modules()}
    dims = {f"{rel[id(lin)]}.{p}": dim for lin, dim in zip(ffn(layers[0]), (0, 0, 1))
            for p in (("weight", "bias") if dim == 0 else ("weight",))}  # down's bias is per hidden unit: kept
    index = {o: j for j, o in enumerate(after.kept_layers)}
    out = {}
    for name, st in moments.items():
        if not name.startswith(prefix + "."):
            out[name] = st
            continue
        i, rest = name[len(prefix) + 1:].split(".", 1)
        j = index.get(before.kept_layers[int(i)])
        if j is None:  # the layer was removed
            continue
        if rest in dims:
            pos = {o: p for p, o in enumerate(before.kept_neurons[int(i)])}
            idx = torch.tensor([pos[o] for o in after.kept_neurons[j]])
            st = {k: v if v.dim() == 0 else v.index_select(dims[rest], idx) for k, v in st.items()}
        out[f"{prefix}.{j}.{rest}"] = st
    return out
