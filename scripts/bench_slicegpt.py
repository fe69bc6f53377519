"""What SliceGPT (ptl.py --baseline slicegpt) does to a model, measured on held-out texts against the dense model:

1. rotation only (every basis kept, the full width): the logits must match the dense model's to float error;
2. the slice at --target-ratio: how far the logits move (mean KL of the next-token distributions, top-1
   agreement, log-perplexity), with the size, the width and the FLOP ratio of one 128-token forward.

Speed is evaluate.py's job: `python evaluate.py --model smollm2-135m --compare out/sg/round_1 --tasks offline`.

    python scripts/bench_slicegpt.py                     # default model (SmolLM2-135M), offline texts, CPU
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402
import slicegpt  # noqa: E402
from data import load_texts, make_batches
from models import DEFAULT_MODEL, load_model  # noqa: E402
from ptl_common import count_params, flag, run_cli  # noqa: E402


@dataclass
class Config:
    """Logit drift of SliceGPT's rotation alone and of its slice, on texts that calibration never saw."""
    model: str = flag(DEFAULT_MODEL, "the dense model")
    target_ratio: float = flag(0.2, "ptl.py --baseline slicegpt --target-ratio")
    calib_samples: int = flag(32, "calibration texts (rows 0 .. n of the offline data, as ptl.py draws them)")
    eval_samples: int = flag(32, "held-out texts (the rows after the calibration texts)")
    max_length: int = flag(512, "tokens per text")
    batch_size: int = flag(8, "texts per forward pass")


def add_drift(acc: dict, ref: torch.Tensor, new: torch.Tensor, b: dict) -> None:
    """Accumulate into acc, over the real tokens of batch b: max |new - ref| relative to max |ref|, KL(ref || new)
    of the next-token distributions, top-1 agreement, and next-token cross-entropies. ref, new (B, T, V) logits."""
    m = b["attention_mask"].bool()
    nxt = m[:, 1:]  # positions whose next token is real: (B, T - 1)
    labels = b["input_ids"][:, 1:][nxt]
    r, x = ref[m], new[m]
    acc["max_rel"] = max(acc.get("max_rel", 0.0), ((x - r).abs().max() / r.abs().max()).item())
    for k, v in (("kl", F.kl_div(x.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="sum")),
                 ("top1", (x.argmax(-1) == r.argmax(-1)).sum()), ("tokens", m.sum()),
                 ("ce", F.cross_entropy(new[:, :-1][nxt], labels, reduction="sum")),
                 ("ce_dense", F.cross_entropy(ref[:, :-1][nxt], labels, reduction="sum")), ("targets", nxt.sum())):
        acc[k] = acc.get(k, 0.0) + v.item()


@torch.no_grad()
def main(cfg: Config) -> dict:
    model, tok = load_model(cfg.model, dtype="float32")
    texts = load_texts("offline", n=cfg.calib_samples + cfg.eval_samples, seed=0)
    calib, held_out = (make_batches(tok, t, max_length=cfg.max_length, batch_size=cfg.batch_size)
                       for t in (texts[:cfg.calib_samples], texts[cfg.calib_samples:]))
    width = slicegpt.slice_width(model, cfg.target_ratio)
    variants = {"rotation only": copy.deepcopy(model), f"sliced to {width}": copy.deepcopy(model)}
    for (name, m), w in zip(variants.items(), (model.config.hidden_size, width)):
        slicegpt.slice_model(m, calib, w)
    acc = {name: {} for name in variants}
    for b in held_out:
        ref = model(**b).logits.float()
        for name, m in variants.items():
            add_drift(acc[name], ref, m(**b).logits.float(), b)
    P0 = count_params(model)["total"]
    print(f"{cfg.model}: hidden size {model.config.hidden_size}, {P0 / 1e6:.1f}M parameters; {len(held_out)} "
          f"batches of held-out texts, {int(acc[name]['tokens'])} tokens")
    out = {}
    for name, m in variants.items():
        a, P = acc[name], count_params(m)["total"]
        out[name] = {"params": P, "removed": 1 - P / P0, "max_rel_logit_diff": a["max_rel"],
                     "kl": a["kl"] / a["tokens"], "top1": a["top1"] / a["tokens"], "log_ppl": a["ce"] / a["targets"],
                     "log_ppl_dense": a["ce_dense"] / a["targets"],
                     "flop_ratio_128": report.forward_flops(model.config, 128) / report.forward_flops(m.config, 128)}
        r = out[name]
        print(f"{name:>16}: {P / 1e6:.1f}M params ({r['removed']:.1%} removed) | FLOP ratio {r['flop_ratio_128']:.2f}x"
              f" | max |dlogit| / max |logit| {r['max_rel_logit_diff']:.1e} | KL {r['kl']:.2e} | top-1 agreement "
              f"{r['top1']:.1%} | log-ppl {r['log_ppl']:.3f} (dense {r['log_ppl_dense']:.3f})")
    return out


if __name__ == "__main__":
    run_cli(main, Config)
