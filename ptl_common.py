"""What every module needs and no paper equation: config flags from a dataclass, the distributed helper pair,
timing, atomic checkpoint I/O, and the accessors through which all surgery reaches a model's layers and FFNs."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import types
import typing
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# ----------------------------------------------------------------------------- config


class _NestedParser(argparse.ArgumentParser):
    """A parser for flags handed on inside another flag (ptl.py --cpt-flags "..."): errors raise ValueError
    naming that flag, instead of printing this script's usage and exiting."""

    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")


def flag(default, help: str):
    """A Config field with its --help text: `lr: float = flag(1e-4, "peak learning rate")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(cls, argv: list[str] | None = None, *, within: str = ""):
    """`--kebab-case` flags from the fields of dataclass `cls`; defaults live only in the dataclass. `within`
    names the flag that carried argv (e.g. --cpt-flags), for the error message."""
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").strip()
    p = (_NestedParser(prog=within, add_help=False) if within else argparse.ArgumentParser(
        description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="--debug: show the Python traceback of an error (otherwise one line)"))
    for f in dataclasses.fields(cls):
        t, kw = hints[f.name], {"default": f.default, "help": f.metadata.get("help", " ")}
        if typing.get_origin(t) in (typing.Union, types.UnionType):  # `float | None` -> float
            t = next(a for a in typing.get_args(t) if a is not type(None))
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is typing.Literal:
            kw.update(choices=typing.get_args(t), type=type(typing.get_args(t)[0]))
        else:
            kw["type"] = t
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    try:
        return cls(**vars(p.parse_args(argv)))
    except ValueError as e:
        raise ValueError(f"{within}: {e}") if within and not str(e).startswith(within) else e


def check_ranges(cfg, *, positive: tuple = (), non_negative: tuple = (), unit: tuple = ()) -> None:
    """Refuse, in one line naming each flag, values out of range: every float flag must be finite, `positive`
    fields > 0 (a count >= 1), `non_negative` ones >= 0, `unit` ones within [0, 1]; None (an unset optional
    threshold) passes."""
    def bad(names, ok, need):
        return [f"--{k.replace('_', '-')} {getattr(cfg, k)} (need {need})" for k in names
                if getattr(cfg, k) is not None and not ok(getattr(cfg, k))]
    floats = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)]
    wrong = (bad(floats, math.isfinite, "a finite number") + bad(positive, lambda v: v > 0, "> 0")
             + bad(non_negative, lambda v: v >= 0, ">= 0") + bad(unit, lambda v: 0 <= v <= 1, "within [0, 1]"))
    if wrong:
        raise ValueError("out of range: " + ", ".join(dict.fromkeys(wrong)))


def check_read(cfg, reads: dict, mode: str = "") -> None:
    """Refuse flags set away from their default that the chosen mode does not read, naming flag and mode.
    reads: {field: (reads_it(cfg) -> bool, "when it is read")}, one table per script."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    wrong = [f"--{k.replace('_', '-')} (read only {when})" for k, (reads_it, when) in reads.items()
             if getattr(cfg, k) != defaults[k] and not reads_it(cfg)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} would be ignored{' ' + mode if mode else ''}; drop it")


def check_out(out: str, model: str) -> None:
    """Refuse, before any work, an --out that cannot be written (a file in its path, a read-only directory) or that
    is the --model checkpoint directory or inside it: the run would write over its input."""
    o = Path(out).resolve()
    there = next(a for a in (o, *o.parents) if a.exists())  # the part of the path that exists already
    if not there.is_dir() or not os.access(there, os.W_OK):
        raise ValueError(f"--out {out}: {there} is {'a file' if not there.is_dir() else 'not writable'}; "
                         "choose another --out")
    if (Path(model) / "config.json").is_file():
        m = Path(model).resolve()
        if o == m or m in o.parents:
            raise ValueError(f"--out {out} is inside --model {model}: the run would write over the model it reads; "
                             "choose another --out")


def same_path(model: str) -> str:
    """A local --model as one spelling (DIR/ and DIR are one model, and a resumed run compares the recorded one);
    a hub name as it is."""
    return os.path.normpath(model) if Path(model).exists() else model


def nonfinite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (this rank's shard under FSDP); [] when all are finite."""
    return [n for n, p in model.named_parameters()
            if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]


# A user's mistake or a refused input: a bad value, a missing file or model, malformed data, an unsupported
# model, a full disk, a run stopped on purpose (NaN). Reported in one line; anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, FloatingPointError)


def run_cli(main, cls, argv: list[str] | None = None) -> None:
    """`python script.py ...`: main(parse_config(cls, argv)), with a user error (USER_ERRORS) reported the way
    argparse reports a bad flag: one line `script.py: error: ...` on stderr and exit status 2 (rank 0 only under
    torchrun). --debug raises it instead, with its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        main(parse_config(cls, [a for a in argv if a != "--debug"]))
    except USER_ERRORS as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{Path(sys.argv[0]).name}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU), else one process."""
    try:
        kind = torch.device("cpu" if device == "auto" else device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device auto or cpu")
    cuda = torch.cuda.is_available() if device == "auto" else kind == "cuda"
    if "RANK" not in os.environ:  # plain `python script.py`
        return Dist(0, 0, 1, torch.device("cuda" if cuda else (device if device != "auto" else "cpu")))
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), dev)


def cleanup_dist() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max"); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def all_reduce_dict(values: dict[str, float], device, op: str = "sum") -> dict[str, float]:
    """{name: value} summed (or maxed) over ranks, in float64: a named reduction instead of indexing a tensor."""
    t = all_reduce_(torch.tensor(list(values.values()), dtype=torch.float64, device=device), op)
    return dict(zip(values, t.tolist()))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict, *, repeats: int, warmup: int, desc: str | None = None) -> dict[str, list[float]]:
    """{name: seconds of each of `repeats` timed calls} of every fn in `fns`, after `warmup` untimed rounds; the
    fns alternate within every round, so that the drift of a shared, noisy machine hits all of them alike.
    `desc`: show a progress bar over the rounds (rank 0)."""
    from tqdm import tqdm

    times = {k: [] for k in fns}
    for r in tqdm(range(warmup + repeats), desc=desc, disable=desc is None or not is_main(), leave=False):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def spread(times: list[float]) -> float:
    """(max - min) / median of repeated timings: how far one run could be from another."""
    return (max(times) - min(times)) / statistics.median(times)


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_json(path: str | Path, obj) -> None:
    """Write JSON to a temporary sibling, then rename: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary sibling directory that becomes `final` only if the block completes.

    A crash leaves at most a `.NAME.tmp-PID` directory, never a half-written `final`. Raises
    FileExistsError (and discards the new one) if `final` appeared meanwhile."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, final)
    except BaseException as e:
        full = isinstance(e, Exception) and shutil.disk_usage(tmp.parent).free < (16 << 20)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # torch says "unexpected pos", safetensors "IoError": say what happened, and where
            raise OSError(errno.ENOSPC, f"no space left on device while writing {final}; free some space and re-run "
                                        "the same command to resume") from e
        if isinstance(e, OSError) and final.exists():
            raise FileExistsError(f"{final} already exists; not overwriting it") from e
        raise


def save_checkpoint(path: str | Path, model, tok, *, json_files: dict | None = None, tensors: dict | None = None,
                    copies: dict | None = None) -> None:
    """Rank 0 writes an HF checkpoint (model + tokenizer) plus extra JSON / safetensors files (and copies of
    the files in `copies`, {name: source}) into a temporary directory, then checksums.json (the SHA-256 of every
    file, which verify_checkpoint checks), and renames it to `path`; every rank waits until it is there."""
    from safetensors.torch import save_file

    if is_main():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for name, obj in (json_files or {}).items():
                atomic_write_json(tmp / name, obj)
            for name, named in (tensors or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, tmp / name)
            for name, src in (copies or {}).items():
                shutil.copy(src, tmp / name)
            atomic_write_json(tmp / CHECKSUMS, {f.name: sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()})
    barrier()


CHECKSUMS = "checksums.json"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | Path, required: tuple = ("config.json",)) -> str | None:
    """Why the checkpoint directory `path` cannot be trusted, or None if it is intact: every file that its
    checksums.json lists has that SHA-256 (a checkpoint written before checksums existed only needs `required`)."""
    path = Path(path)
    try:
        sums = json.loads((path / CHECKSUMS).read_text()) if (path / CHECKSUMS).exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    for name in [*required, *sums]:
        if not (path / name).is_file():
            return f"{name} is missing"
        if name in sums and sha256(path / name) != sums[name]:
            return f"{name} is not what was written (its SHA-256 differs from {CHECKSUMS})"
    return None


def settings_changed(old: dict, new: dict, resumable: set) -> dict:
    """{setting: (old, new)} for each setting of `new` outside `resumable` that `old` (a saved run's) holds with
    another value; a setting the old run predates (a flag added since) is not a change."""
    return {k: (old[k], v) for k, v in new.items() if k not in resumable and k in old and old[k] != v}


def finished_rounds(out: str | Path) -> list[int]:
    """Round numbers t with a complete OUT/round_<t>/ of a PTL run (directories appear only when complete)."""
    found = (re.fullmatch(r"round_(\d+)", p.name) for p in Path(out).glob("round_*")
             if (p / "ptl_record.json").exists())
    return sorted(int(m[1]) for m in found if m)


def load_record(round_dir: str | Path) -> dict:
    """A PTL round's ptl_record.json (removed_neurons is keyed by original layer index, a string in JSON)."""
    return json.loads((Path(round_dir) / "ptl_record.json").read_text())


def set_aside_damaged(out: Path) -> None:
    """Rank 0: while the last finished round of OUT is damaged (a file that differs from its checksum, a missing
    or unreadable one, a record that does not parse), say so by path and rename it round_<t>.damaged-<time>, so
    the run resumes from the last intact round and redoes the rest. Nothing is deleted."""
    for t in reversed(finished_rounds(out)):
        path = out / f"round_{t}"
        why = verify_checkpoint(path, required=("config.json", "ptl_record.json", "model.safetensors", CHECKSUMS))
        if why is None:
            try:
                load_record(path)
                return
            except (OSError, json.JSONDecodeError) as e:
                why = f"ptl_record.json is unreadable ({e})"
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(path, aside)
        print0(f"{path} is damaged: {why}. Moved it to {aside}; resuming from the round before it")



def prepare_out(out: Path, d) -> Path:
    """Rank 0 makes OUT, deletes what a killed run left half-written and sets a damaged last round aside."""
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".round_*.tmp-*"):  # never a finished round
            shutil.rmtree(stale, ignore_errors=True)
        set_aside_damaged(out)
    barrier()
    return out


def human(n: float) -> str:
    """134515008 -> '134.5M'."""
    for d, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= d:
            return f"{n / d:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- evaluate.py vs Hugging Face's evaluate

_ROOT = Path(__file__).resolve().parent


def import_evaluate():
    """This project's evaluate.py, imported as `ptl_evaluate`: Hugging Face's `evaluate` package has the same
    name and lm-eval imports it inside some tasks (mbpp, squad), so `sys.modules["evaluate"]` stays theirs."""
    if "ptl_evaluate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ptl_evaluate", _ROOT / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["ptl_evaluate"] = module
        spec.loader.exec_module(module)
    return sys.modules["ptl_evaluate"]


def unshadow_evaluate() -> None:
    """Move this checkout's directory behind site-packages on sys.path. `python evaluate.py` (or ptl.py) puts
    it first, where our evaluate.py would answer an lm-eval task's `import evaluate`; behind site-packages
    our modules stay importable (nothing installed has their names) and `evaluate` is Hugging Face's."""
    mine = [p for p in sys.path if p and Path(p).resolve() == _ROOT]
    if mine:
        sys.path[:] = [p for p in sys.path if p not in mine] + mine[:1]


# ----------------------------------------------------------------------------- model structure
# The only model-specific knowledge in PTL: where the decoder layers are, and what their FFN is.


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers for Llama, Qwen2/3, Gemma2, Mistral, ... (the base model's `layers`)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise unsupported(model, "it has no decoder-layer list at model.model.layers")
    return layers



def ffn(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(gate_proj, up_proj, down_proj) of a decoder layer whose MLP is down(act(gate x) * up x)."""
    parts = tuple(getattr(getattr(layer, "mlp", None), n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise unsupported(layer, "its layers have no mlp.gate_proj/up_proj/down_proj Linear modules")
    return parts



def unsupported(module: nn.Module, why: str) -> ValueError:
    kind = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    return ValueError(f"unsupported architecture {kind!r}: {why}. PTL prunes gated FFNs "
                      "down_proj(act_fn(gate_proj x) * up_proj x) (Llama, Qwen2/3, Gemma2, Mistral, ...); "
                      "GPT-2-style MLPs, fused gate_up_proj and MoE experts are not supported.")



def hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's input hidden states (B, T, d), from a forward pre-hook's arguments."""
    return args[0] if args else kwargs["hidden_states"]



def check_supported(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        ffn(layer)



def count_params(model: torch.nn.Module) -> dict:
    """Total parameters (tied weights once) and those outside the input/output embeddings."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    out = model.get_output_embeddings()
    if out is not None:
        emb[id(out.weight)] = out.weight.numel()
    return {"total": total, "non_embedding": total - sum(emb.values())}
