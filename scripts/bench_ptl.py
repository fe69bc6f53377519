"""Three measurements of ptl.py on one model, each a ratio of two things timed side by side in one run
(on a shared machine an absolute time means nothing):

1. calibration overhead: a forward pass with PTL's score hooks / the same forward without hooks;
2. literal Eq. 2 (remove one neuron, re-run its layer, for every neuron) / PTL's one hooked pass,
   extrapolated from a sample of neurons; plus how well the two rank that sample (Spearman);
3. realized speed: pruned / dense forward tokens per second at equal inputs, next to the FLOP ratio;
4. the Eq. 4 hook: each row's real tokens read in place against gathered by the mask (`--hook-only`: just this).

    python scripts/bench_ptl.py                       # default model (SmolLM2-135M), offline data, CPU
    python scripts/bench_ptl.py --pruned out/ptl/round_2      # speed of a checkpoint that ptl.py wrote
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import fast
import ptl  # noqa: E402
import ptl_common  # noqa: E402
from data import load_texts, make_batches
from models import DEFAULT_MODEL, load_model  # noqa: E402
from ptl_common import alternate, check_ranges, count_params, run_cli  # noqa: E402


@dataclass
class Config:
    """Benchmark ptl.py: calibration overhead, literal Eq. 2 cost, realized speedup of a pruned model."""
    model: str = DEFAULT_MODEL
    calib_samples: int = 32
    max_length: int = 256
    batch_size: int = 8
    repeats: int = 7
    warmup: int = 2
    eq2_layers: int = 2  # literal Eq. 2 on this many layers x ...
    eq2_neurons: int = 8  # ... this many neurons each, then extrapolated to every neuron
    pruned: str = ""  # speed test: a pruned checkpoint of --model (e.g. out/ptl/round_2); else built here by:
    neuron_frac: float = 0.5  # for the speed test: remove this fraction of every layer's FFN neurons
    drop_layers: int = 0  # ... and this many layers
    speed_batch: int = 8
    speed_len: int = 256
    threads: int = 0  # torch threads (0: torch's default)
    hook_only: bool = False  # only measurement 4: the Eq. 4 statistic read in place vs gathered

    def __post_init__(self):
        check_ranges(self, positive=("calib_samples", "max_length", "batch_size", "repeats", "eq2_layers",
                                     "eq2_neurons", "speed_batch", "speed_len"),
                     non_negative=("warmup", "drop_layers", "threads"), unit=("neuron_frac",))


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """Median seconds of each fn, alternated (ptl_common.alternate)."""
    return {k: statistics.median(v) for k, v in alternate(fns, repeats=repeats, warmup=warmup).items()}


@torch.no_grad()
def calibration_overhead(model, batches, cfg) -> dict:
    """{hooked pass: (median, lowest, highest) over the repeats of its time / the plain pass's time in the same
    repeat}. The variants alternate batch by batch, in an order rotated from one batch to the next, so the
    drift of a shared machine reaches every variant within seconds of the others; a repeat sums its batches."""
    def plain(bs):
        for b in bs:
            model.base_model(**b, use_cache=False)
    variants = {"plain": plain, "neurons": lambda bs: ptl.score_pass(model, bs, layer_rule=None),
                "neurons+layers": lambda bs: ptl.score_pass(model, bs),
                "released": lambda bs: baselines.released_counts(model, bs, 0.84)}
    names, t = list(variants), {k: [] for k in variants}
    for r in range(cfg.warmup + cfg.repeats):
        this = dict.fromkeys(names, 0.0)
        for i, b in enumerate(batches):
            for k in names[i % len(names):] + names[: i % len(names)]:
                t0 = time.perf_counter()
                variants[k]([b])
                this[k] += time.perf_counter() - t0
        if r >= cfg.warmup:
            for k in names:
                t[k].append(this[k])
    ratios = {k: [a / p for a, p in zip(v, t["plain"])] for k, v in t.items() if k != "plain"}
    return {k: (statistics.median(r), min(r), max(r)) for k, r in ratios.items()}


@torch.no_grad()
def literal_eq2(model, batches, cfg) -> dict:
    """Eq. 2 as written: for neuron N of layer l, max over tokens of ||f_l(h) - f_{l\\N}(h)||_2, by re-running
    layer l with N's down_proj column zeroed. Inputs h of each layer are captured once (free for Eq. 2)."""
    layers = ptl_common.decoder_layers(model)
    L, I = len(layers), model.config.intermediate_size
    chosen = torch.linspace(0, L - 1, cfg.eq2_layers).long().tolist()
    cap = {}  # per layer: [(args, kwargs, output)] for every batch

    def keep(l):
        def fn(mod, args, kwargs, out):
            cap.setdefault(l, []).append((args, kwargs, out[0] if isinstance(out, tuple) else out))
        return fn

    hs = [layers[l].register_forward_hook(keep(l), with_kwargs=True) for l in chosen]
    for b in batches:
        model.base_model(**b, use_cache=False)
    for h in hs:
        h.remove()
    ours = ptl.score_pass(model, batches, layer_rule=None)["neuron"]
    neurons = torch.randperm(I, generator=torch.Generator().manual_seed(0))[: cfg.eq2_neurons].tolist()
    eq2, t0 = {}, time.perf_counter()
    for l in chosen:
        down = ptl_common.ffn(layers[l])[2]
        for j in neurons:
            col = down.weight[:, j].clone()
            down.weight[:, j] = 0
            worst = 0.0
            for (args, kwargs, out), b in zip(cap[l], batches):
                f = layers[l](*args, **kwargs)
                f = f[0] if isinstance(f, tuple) else f
                worst = max(worst, (out - f).norm(dim=-1)[b["attention_mask"].bool()].max().item())
            down.weight[:, j] = col
            eq2[(l, j)] = worst
    per_neuron = (time.perf_counter() - t0) / len(eq2)
    ours_t = interleaved({"ours": lambda: ptl.score_pass(model, batches, layer_rule=None)}, 3, 1)["ours"]
    a = torch.tensor([eq2[k] for k in eq2])
    b = torch.tensor([ours[l, j].item() for l, j in eq2])
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()
    return {"eq2_all_neurons_s": per_neuron * L * I, "ptl_pass_s": ours_t,
            "ratio": per_neuron * L * I / ours_t, "spearman_on_sample": spearman, "sample": len(eq2)}


def counted_flops(model, ids) -> int:
    """FLOPs of one forward over ids as torch's FlopCounterMode counts them (evaluate.forward_flops computes the
    same from the config alone)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return fc.get_total_flops()


@torch.no_grad()
def realized_speed(model, cfg) -> dict:
    I, L = model.config.intermediate_size, model.config.num_hidden_layers
    if cfg.pruned:
        pruned = load_model(cfg.pruned, dtype="float32", device="cpu")[0]
    else:  # which neurons and layers go does not change the speed
        pruned = copy.deepcopy(model)
        ptl.prune_neurons(pruned, [torch.arange(round(I * (1 - cfg.neuron_frac)))] * L)
        ptl.drop_layers(pruned, list(range(L - cfg.drop_layers, L)))
    ids = torch.randint(0, model.config.vocab_size, (cfg.speed_batch, cfg.speed_len),
                        generator=torch.Generator().manual_seed(0))
    t = interleaved({"dense": lambda: model(input_ids=ids, use_cache=False),
                     "pruned": lambda: pruned(input_ids=ids, use_cache=False)}, cfg.repeats, cfg.warmup)
    eager = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        m.config._attn_implementation, was = "eager", m.config._attn_implementation  # count attention matmuls
        eager[name] = counted_flops(m, ids[:1])
        m.config._attn_implementation = was
    flop_ratio = eager["dense"] / eager["pruned"]
    speedup = t["dense"] / t["pruned"]
    return {"width": f"{I} -> {pruned.config.intermediate_size}", "layers": f"{L} -> {pruned.config.num_hidden_layers}",
            "param_ratio": count_params(model)["total"] / count_params(pruned)["total"], "flop_ratio": flop_ratio,
            "speedup": speedup, "speedup_over_flop_ratio": speedup / flop_ratio}


def hook_cost(cfg: Config) -> dict:
    """Seconds of one Eq. 4 hook call on an (8, 256, I) activation with ragged padding: each row's real tokens read
    in place (real_spans, what the hook does) against gathered by the mask first; medians, alternated."""
    g = torch.Generator().manual_seed(0)
    act, mask = torch.randn(8, 256, 1536, generator=g), torch.ones(8, 256, dtype=torch.bool)
    mask[3, 200:], mask[5, 100:] = False, False
    spans = fast.real_spans(mask)
    t = interleaved({"in place": lambda: ptl.neuron_score(act, mask, spans),
                     "gathered": lambda: ptl.neuron_score(act, mask)}, 35, 5)
    print(f"4. Eq. 4 hook on (8, 256, 1536): read in place {t['in place'] * 1e3:.2f} ms, gathered "
          f"{t['gathered'] * 1e3:.2f} ms: {t['gathered'] / t['in place']:.2f}x")
    return t


def main(cfg: Config) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.hook_only:
        return {"hook": hook_cost(cfg)}
    model, tok = load_model(cfg.model, dtype="float32", device="cpu")
    batches = make_batches(tok, load_texts("offline", n=cfg.calib_samples, seed=0), max_length=cfg.max_length,
                           batch_size=cfg.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"model {cfg.model} | {len(batches)} batches, {tokens} tokens | torch threads {torch.get_num_threads()}")
    res = {"calibration_overhead": calibration_overhead(model, batches, cfg)}
    print(f"1. calibration overhead (hooked pass / plain pass in the same repeat; median [lowest, highest] of "
          f"{cfg.repeats}):", " | ".join(f"{k} {m:.3f}x [{lo:.3f}, {hi:.3f}]"
                                         for k, (m, lo, hi) in res["calibration_overhead"].items()))
    res["literal_eq2"] = literal_eq2(model, batches, cfg)
    e = res["literal_eq2"]
    print(f"2. literal Eq. 2 over all neurons / one PTL pass: {e['ratio']:.0f}x "
          f"(extrapolated from {e['sample']} neurons; Spearman rank agreement on them {e['spearman_on_sample']:.3f})")
    res["speed"] = realized_speed(model, cfg)
    s = res["speed"]
    print(f"3. pruned (width {s['width']}, layers {s['layers']}): params {s['param_ratio']:.3f}x smaller, "
          f"FLOPs {s['flop_ratio']:.3f}x fewer, forward {s['speedup']:.3f}x faster "
          f"= {s['speedup_over_flop_ratio']:.3f} of the FLOP ratio")
    res["hook"] = hook_cost(cfg)
    return res


if __name__ == "__main__":
    run_cli(main, Config)
