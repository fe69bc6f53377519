"""Every criterion and one-cut method PTL is compared with (Table 1 and the ablations), behind two registries that the
loop calls without knowing which it has: NEURON_CRITERIA and LAYER_CRITERIA, each (model, calibration batches, ...) ->
scores, lower = removed first. The paper's own criteria (Eq. 4 and 5) and their hooked pass are in ptl.py; SliceGPT
is in slicegpt.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ptl_common import all_reduce_, count_params, decoder_layers, ffn, hidden_in, is_main
from slicegpt import check_sliceable, slice_width
from trainer import token_loss_sum

# ----------------------------------------------------------------------------- the authors' released rule

def released_scores(counts: torch.Tensor, n: int, lang: torch.Tensor | None = None, n_lang: int = 0) -> torch.Tensor:
    """The authors' released rule as a score (lower = pruned first), (L, 3, I) counts -> (L, I).

    Per layer, for each part p in {gate_proj output, up_proj output, Act}: C_p = the neurons in the bottom-n
    of the *signed* values at the last token of every math sample (intersection), G_p = those in the
    top-n of every general-text sample ("language neurons"). Candidates = U_p (C_p \\ G_p); the code removes
    the k lowest *indices* among them. Here counts[l, p, j] = #samples with j in part p's bottom-n, and
    score_j = min_p (n - counts), +inf where j is in G_p: candidates score 0, so a stable sort removes the
    lowest candidate indices first, as released. With fewer than k candidates the next neurons are those in
    the bottom-n of the most samples (the released code would fail to load the model instead)."""
    s = (n - counts).float()
    if lang is not None and n_lang > 0:
        s[lang == n_lang] = math.inf
    return s.amin(dim=1)


def top_count(n: float, width: int) -> int:
    """The released rule's n for a layer of `width` neurons: n < 1 is a fraction of the width, else a count."""
    count = max(1, int(n * width)) if n < 1 else int(n)
    if count >= width:
        raise ValueError(f"--released-top-n {n} leaves no neuron outside the bottom-n of a {width}-wide layer")
    return count


def append_last_token(batch: dict) -> dict:
    """The released rule's input: each right-padded row of (B, T) with a copy of its last real token written
    after it -> (B, T + 1). The authors' customised generate() forwards cat(input_ids, input_ids[:, -1:]) and
    their hooks read position -1, which is this copy, not the text's real last token."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, rows = mask.sum(1), torch.arange(len(ids))  # (B,) real lengths
    ids, mask = F.pad(ids, (0, 1)), F.pad(mask, (0, 1))  # room for the copy after the longest row
    ids[rows, n], mask[rows, n] = ids[rows, n - 1], 1
    return {**batch, "input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def released_counts(model, batches, n: float, largest: bool = False) -> tuple[torch.Tensor, int]:
    """(counts (L, 3, I), texts) summed over torchrun ranks: counts[l, p, j] = the texts at whose last real token neuron
    j's signed value at part p of layer l (0: gate_proj output, 1: up_proj output, 2: Act) is among the layer's n
    lowest (`largest`: highest). n: see top_count."""
    layers = decoder_layers(model)
    I, dev = ffn(layers[0])[0].out_features, next(model.parameters()).device
    n_top, counts = top_count(n, I), torch.zeros(len(layers), 3, I, device=dev)
    texts, st = torch.zeros((), dtype=torch.float64, device=dev), {}

    def hook(l, p):
        def count_last(v):  # v (B, T, I)
            x = v[torch.arange(len(v), device=v.device), st["mask"].sum(1) - 1].float()  # (B, I) at the last token
            counts[l, p] += torch.bincount(x.topk(n_top, dim=-1, largest=largest).indices.flatten(), minlength=I)
        return (lambda mod, args: count_last(args[0])) if p == 2 else (lambda mod, args, out: count_last(out))

    handles = []
    for l, layer in enumerate(layers):
        gate, up, down = ffn(layer)
        handles += [gate.register_forward_hook(hook(l, 0)), up.register_forward_hook(hook(l, 1)),
                    down.register_forward_pre_hook(hook(l, 2))]
    try:
        for b in tqdm(batches, desc="released rule", disable=not is_main(), leave=False):
            b = {k: v.to(dev) for k, v in b.items()}
            st["mask"] = b["attention_mask"].bool()
            texts += len(b["attention_mask"])
            model.base_model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return all_reduce_(counts), int(all_reduce_(texts))


def released_rule(model, calib: list[dict], protect: list[dict] | None, n: float) -> torch.Tensor:
    """(L, I) released_scores of the calibration texts, with the --protect-data texts' top-n as language neurons;
    each text read at a copy of its last token (append_last_token)."""
    counts = released_counts(model, [append_last_token(b) for b in calib], n)
    if protect is None:
        return released_scores(*counts)
    return released_scores(*counts, *released_counts(model, [append_last_token(b) for b in protect], n, largest=True))


# ----------------------------------------------------------------------------- LLM-Pruner's Taylor neurons, and layers


def calib_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over a right-padded batch's real tokens, their count)."""
    dev = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return token_loss_sum(logits, ids.masked_fill(mask == 0, -100))


def lm_loss(model, batches) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of `batches` (log perplexity), over all ranks."""
    tot = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)  # (loss sum, tokens)
    for b in batches:
        tot += torch.stack(calib_loss(model, b)).double()
    all_reduce_(tot)
    return tot[0] / tot[1].clamp(min=1)


def summed_grads(model, params: list, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(dLoss/dW for each of `params`, the real-token count), Loss = the sum of next-token cross-entropies over every
    real token of `batches`, summed over torchrun ranks."""
    grads = [torch.zeros_like(w) for w in params]
    tokens = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for b in batches:
        loss, n = calib_loss(model, b)
        tokens += n
        for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g
    return [all_reduce_(g) for g in grads], all_reduce_(tokens)


def taylor_neuron_scores(model, batches, *, variant: str = "element") -> torch.Tensor:
    """(L, I) LLM-Pruner's first-order importance (Ma et al., 2023, Eq. 3-4) of FFN neuron i's coupled group,
    row i of W_gate and of W_up and column i of W_down, with G = dLoss/dW over the calibration tokens:
        vector-wise    I_i = sum_{W in group} | sum_j W_ij G_ij |       (their `vectorize`)
        element-wise   I_i = sum_{W in group} sum_j | W_ij G_ij |       (their `param_first`)
    the group's matrices reduced by sum, their default. Per token, like taylor_scores; lower = more redundant."""
    mats = [lin.weight for layer in decoder_layers(model) for lin in ffn(layer)]  # gate, up, down per layer
    grads, tokens = summed_grads(model, mats, batches)
    per_row = (lambda x, dim: x.sum(dim).abs()) if variant == "vector" else (lambda x, dim: x.abs().sum(dim))
    wg = [w.detach().double() * g.double() for w, g in zip(mats, grads)]  # (I, d), (I, d), (d, I) per layer
    scores = torch.stack([per_row(wg[i], 1) + per_row(wg[i + 1], 1) + per_row(wg[i + 2], 0)
                          for i in range(0, len(wg), 3)])
    if not scores.isfinite().all():  # NaN would sort last and be silently kept
        raise FloatingPointError("the calibration loss has NaN/inf gradients; Taylor scores would be meaningless "
                                 "(try --dtype float32, or check the checkpoint)")
    return (scores / tokens).float().cpu()


def taylor_scores(model, batches) -> torch.Tensor:
    """(L,) |sum_{w in layer l} w * dLoss/dw|: the first-order change of the calibration loss when layer l's
    weights are set to zero (Taylor criterion, Molchanov et al., 2019, as used for blocks by Kim et al.,
    2024). Gradients are summed over ranks before the products are taken."""
    per_layer = [list(layer.parameters()) for layer in decoder_layers(model)]
    flat = [w for ps in per_layer for w in ps]
    grads, tokens = summed_grads(model, flat, batches)
    wg = iter((w.detach().double() * g.double()).sum() for w, g in zip(flat, grads))
    scores = [sum(next(wg) for _ in ps).abs() / tokens for ps in per_layer]
    return torch.stack(scores).float().cpu()


def perplexity_scores(model, batches) -> torch.Tensor:
    """(L,) |log PPL(model without layer l) - log PPL(model)| on the calibration data: the perplexity
    criterion of depth pruning (Kim et al., 2024, "Shortened LLaMA"). Taken as a change so that a layer
    whose removal helps a (random) model does not rank as indispensable; the order is the same whenever
    removal hurts. Layer l is skipped by returning its input as its output."""
    def skip(mod, args, kwargs, out):
        h = hidden_in(args, kwargs)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    scores = []
    with torch.no_grad():
        base = lm_loss(model, batches)
        for layer in decoder_layers(model):
            handle = layer.register_forward_hook(skip, with_kwargs=True)
            try:
                scores.append((lm_loss(model, batches) - base).abs())
            finally:
                handle.remove()
    return torch.stack(scores).float().cpu()


def block_influence(h: torch.Tensor, f_h: torch.Tensor) -> torch.Tensor:
    """ShortGPT (Men et al., 2024, Eq. 1): BI_l = 1 - cos(h_{l-1}, f_l(h_{l-1})) per token. -> (B, T) fp32"""
    return 1 - F.cosine_similarity(h.float(), f_h.float(), dim=-1)


def protect_top(s: torch.Tensor, general: torch.Tensor, frac: float) -> torch.Tensor:
    """Language protection for Eq. 4 scores: each layer's top `frac` neurons by their general-text score
    are never pruned (score +inf). s, general (L, I)."""
    n = int(frac * s.shape[1])
    return s.scatter(1, general.topk(n, dim=1).indices, math.inf) if n else s


# ----------------------------------------------------------------------------- the registries and one-cut methods
# Neuron criteria: (model, calibration batches, --protect-data batches or None, the loop's Config, round t) -> (L, I).
# Layer criteria: (model, calibration batches) -> (L,). Eq. 4, and Eq. 5 and BI (per-token, hooked), are ptl.py's.
NEURON_CRITERIA = {
    "released": lambda model, calib, protect, cfg, t: released_rule(model, calib, protect, cfg.top_n(t)),
    "taylor": lambda model, calib, protect, cfg, t: taylor_neuron_scores(model, calib, variant=cfg.taylor_variant),
}
PROTECTS_ITSELF = {"released"}  # the others get protect_top of the general text's Eq. 4 scores
LAYER_CRITERIA = {"ppl": perplexity_scores, "taylor": taylor_scores}


def one_cut_rule(cfg):
    """The round's rule of a one-cut baseline, as a loop Config: all that is left goes in one round (neuron step 1,
    an unbounded layer step); ShortGPT ranks layers by Block Influence. As baseline "none" it is a rule, not user
    flags, and is not refused as such."""
    return replace(cfg, baseline="none", neuron_step=1.0, layer_step=10**9,
                   layer_rule="bi" if cfg.baseline == "shortgpt" else cfg.layer_rule)


def ignored_flags(cfg) -> tuple:
    """ptl.py flags that have no effect under --baseline or --apply-removal (they remove everything at once, by
    their own rule)."""
    depth = ("order", "neuron_step", "layer_step", "layer_target", "neuron_rule", "layer_rule", "sigma_neuron",
             "sigma_layer")  # ShortGPT removes only the lowest-Block-Influence layers, as many as the size needs
    width = depth + ("protect_data", "protect_samples", "calib_per_round", "taylor_variant", "released_top_n")
    if cfg.apply_removal:  # the plan says what goes: nothing is scored
        return width + ("target_ratio", "calib_data", "calib_samples", "batch_size", "protect_frac")
    return {"none": (), "prune-once": ("order", "layer_step"), "shortgpt": depth, "slicegpt": width}[cfg.baseline]


def one_cut_left(model, cfg) -> dict | None:
    """What a one-cut method removes from the dense model, as the loop's `left` (None for PTL itself):
    --apply-removal's plan, ShortGPT's layers, or SliceGPT's slice of the hidden size ("width")."""
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    if cfg.apply_removal:
        return plan_left(read_plan(cfg.apply_removal), L, I)
    if cfg.baseline == "shortgpt":
        return {"neurons": 0, "layers": shortgpt_layers(model, cfg.target_ratio)}
    if cfg.baseline == "slicegpt":
        check_sliceable(model)
        return {"neurons": 0, "layers": 0, "width": model.config.hidden_size - slice_width(model, cfg.target_ratio)}
    return None


def shortgpt_layers(model, ratio: float) -> int:
    """ShortGPT's depth cut: the fewest whole layers whose removal takes >= ratio of all parameters."""
    L, per_layer = len(decoder_layers(model)), sum(p.numel() for p in decoder_layers(model)[0].parameters())
    n = math.ceil(ratio * count_params(model)["total"] / per_layer)
    if n >= L:
        raise ValueError(f"--baseline shortgpt --target-ratio {ratio} would remove all {L} layers")
    return n


def read_plan(path: str) -> dict:
    """The ptl_record.json of a finished round (or its directory): what its run had kept, in dense numbering."""
    f = Path(path) / "ptl_record.json" if Path(path).is_dir() else Path(path)
    try:
        rec = json.loads(f.read_text())
        return {k: rec[k] for k in ("dense", "kept_layers", "kept_neurons")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--apply-removal {path}: not a finished round's ptl_record.json ({e})") from None


def plan_cuts(plan: dict, left: dict, kept_layers: list[int], kept_neurons: list[list[int]]) -> list[tuple]:
    """The cuts that take a model (kept_layers, kept_neurons: dense numbering) to `plan`'s units, as the loop's
    (kind, what) in the order it applies them: neurons first, then layers, as in a PTL round. A layer that goes
    anyway gives up its last `left["neurons"]` neurons, so that every layer keeps the same width."""
    keep = {o: set(kn) for o, kn in zip(plan["kept_layers"], plan["kept_neurons"])}
    k, cuts = left["neurons"], []
    if k:
        gone = [[j for j, x in enumerate(kn) if x not in keep[o]] if o in keep else range(len(kn) - k, len(kn))
                for o, kn in zip(kept_layers, kept_neurons)]
        cuts.append(("neurons", [torch.tensor(g) for g in gone]))
    if left["layers"]:  # layer indices are unchanged by a neuron cut
        cuts.append(("layers", [i for i, o in enumerate(kept_layers) if o not in keep]))
    return cuts


def plan_left(plan: dict, L: int, I: int) -> dict:
    """What a plan removes from a model of L layers x I neurons: {"neurons": per layer, "layers": count}."""
    dense = plan["dense"]
    if (dense["num_hidden_layers"], dense["intermediate_size"]) != (L, I):
        raise ValueError(f"--apply-removal: the plan was made on {dense['num_hidden_layers']} layers x "
                         f"{dense['intermediate_size']} neurons, this model has {L} x {I}")
    left = {"neurons": I - len(plan["kept_neurons"][0]), "layers": L - len(plan["kept_layers"])}
    if not any(left.values()):
        raise ValueError("--apply-removal: the plan removes nothing")
    return left
