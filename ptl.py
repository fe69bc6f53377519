"""The Prune-Tune Loop (PTL): Algorithm 1 of "Gradually Compacting Large Language Models for Reasoning
Like a Boiling Frog". Each round scores FFN neurons (Eq. 3-4) or decoder layers (Eq. 5-6) on reasoning
sequences, removes the most redundant ones physically, recovers (`--recovery`), and saves OUT/round_<t>/:
an ordinary Hugging Face checkpoint plus ptl_record.json. Re-running the same command resumes.

Where this departs from the paper and from the authors' released code, and why: README, "Departures".

    python ptl.py --rounds 2                                  # default model, offline data, CPU
    torchrun --nproc_per_node 2 ptl.py --rounds 2             # 2 processes: gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 8 ptl.py --model meta-llama/Meta-Llama-3-8B --layer-target 2 \\
        --calib-data AI-MO/NuminaMath-CoT,meta-math/MetaMathQA --out out/llama3
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

import baselines
import recover
import trainer
from data import calibration_texts, check_sources, load_qa, load_texts
from fast import real_spans
from models import DEFAULT_MODEL, load_model
from ptl_common import (all_reduce_, atomic_write_json, check_out, check_ranges, check_read, check_supported,
                        cleanup_dist, count_params, decoder_layers, ffn, finished_rounds, flag, hidden_in,
                        import_evaluate, is_main, load_record, parse_config, prepare_out, print0, run_cli, same_path,
                        save_checkpoint, settings_changed, setup_dist, unshadow_evaluate)
from report import round_line, run_result, score_summary, summary_line
from slicegpt import slice_round

# ----------------------------------------------------------------------------- equations (pure)


def neuron_score(act: torch.Tensor, mask: torch.Tensor, spans: list | None = None) -> torch.Tensor:
    """Eq. 3-4 statistic: s_j = max_x |Act_j(x)|, Act(x) = act_fn(W_gate x) * (W_up x), over real tokens x.

    act (B, T, I) is the input of down_proj (that is Act itself); mask (B, T) bool; spans (optional, from
    real_spans(mask)): each row's real tokens as one (start, end), read in place instead of gathered. -> (I,) fp32"""
    if spans is None:
        lo, hi = torch.aminmax(act[mask], dim=0)  # (N, I) -> (I,), (I,): no |act| copy
    else:  # one read of each row's real tokens, no (N, I) copy
        rows = [torch.aminmax(act[b, s:e], dim=0) for b, (s, e) in enumerate(spans)]  # B x ((I,), (I,))
        lo, hi = torch.stack([r[0] for r in rows]).amin(0), torch.stack([r[1] for r in rows]).amax(0)
    return torch.maximum(hi, -lo).float()


def redundant_neurons(s: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 4: R_N = {N : Act^N(x) <= sigma_neuron for all x}, as a bool mask over scores s (L, I)."""
    return s <= sigma


def uniform_count(s: torch.Tensor, sigma: float) -> int:
    """k = min_l |R_N^l|: the most neurons every layer can lose while all removed ones are in Eq. 4's R_N."""
    return int(redundant_neurons(s, sigma).sum(dim=1).min())


def layer_change(h: torch.Tensor, f_h: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ||f_l(h_{l-1}) - h_{l-1}||_2 per token. h, f_h (B, T, d) -> (B, T) fp32"""
    return (f_h.float() - h.float()).norm(dim=-1)


def redundant_layers(s: torch.Tensor, sigma: float) -> list[int]:
    """Eq. 6: R_L = {l : ||f_l(h) - h||_2 <= sigma_layer}, over layer scores s (L,)."""
    return (s <= sigma).nonzero().flatten().tolist()


def lowest(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores; ties go to the lower index (stable sort)."""
    return torch.sort(s, stable=True).indices[:k]


# ----------------------------------------------------------------------------- calibration passes


def score_hooks(layers, metric, neu, lay, st) -> list:
    """Forward hooks that accumulate score_pass's scores into neu (L, I) (unless None) and lay (L,) as batches pass;
    st["mask"] (B, T) marks the real tokens of the current batch. Returns the handles, to remove afterwards."""
    def eq4_hook(l):
        def fn(mod, args):  # args[0]: Act (B, T, I), the input of down_proj
            torch.maximum(neu[l], neuron_score(args[0], st["mask"], st["spans"]), out=neu[l])
        return fn

    def layer_in(l):
        def fn(mod, args, kwargs):
            st[l] = hidden_in(args, kwargs)  # h_{l-1} (B, T, d)
        return fn

    def layer_out(l):
        def fn(mod, args, kwargs, out):
            f_h = out[0] if isinstance(out, tuple) else out  # f_l(h_{l-1}) (B, T, d)
            lay[l] += metric(st.pop(l), f_h)[st["mask"]].sum()
        return fn

    handles = []
    for l, layer in enumerate(layers):
        if neu is not None:
            handles.append(ffn(layer)[2].register_forward_pre_hook(eq4_hook(l)))
        if metric is not None:
            handles += [layer.register_forward_pre_hook(layer_in(l), with_kwargs=True),
                        layer.register_forward_hook(layer_out(l), with_kwargs=True)]
    return handles


LAYER_METRICS = {"distance": layer_change, "bi": baselines.block_influence}  # per-token layer criteria (hooked)


@torch.no_grad()
def score_pass(model, batches, *, neurons: bool = True, layer_rule: str | None = "distance") -> dict:
    """One forward per batch through the base model (scores never need the LM head), with hooks.

    Returns {"neuron": (L, I) Eq. 4 maxima (None without `neurons`), "layer": (L,) token means of Eq. 5 or BI,
    "tokens"}, combined over torchrun ranks (MAX for maxima, SUM otherwise), so every rank gets identical scores.
    Memory is O(L * I), independent of the number of tokens."""
    layers = decoder_layers(model)
    L, I = len(layers), ffn(layers[0])[0].out_features
    dev = next(model.parameters()).device
    neu = torch.zeros(L, I, device=dev) if neurons else None
    lay = torch.zeros(L, dtype=torch.float64, device=dev)
    tokens = torch.zeros((), dtype=torch.float64, device=dev)
    st: dict = {}  # the current batch's mask, and each layer's input until its output arrives
    handles = score_hooks(layers, LAYER_METRICS.get(layer_rule), neu, lay, st)
    try:
        for b in tqdm(batches, desc="calibration", disable=not is_main(), leave=False):
            b = {k: v.to(dev) for k, v in b.items()}
            st["mask"] = b["attention_mask"].bool()
            st["spans"] = real_spans(st["mask"])
            tokens += st["mask"].sum()
            model.base_model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    all_reduce_(lay)
    all_reduce_(tokens)
    if neu is not None:
        all_reduce_(neu, "max")
    if not ((neu is None or neu.isfinite().all()) and lay.isfinite().all()):  # NaN would sort last: kept silently
        raise FloatingPointError("the model produced NaN/inf activations on the calibration data; "
                                 "scores would be meaningless (try --dtype float32, or check the checkpoint)")
    return {"neuron": neu, "layer": (lay / tokens.clamp(min=1)).float(), "tokens": int(tokens)}


def neuron_scores(model, batches, *, rule: str = "eq4", top_n: float = 0.84) -> list[torch.Tensor]:
    """Per decoder layer, an (intermediate_size,) score; lower = more redundant. rule: "eq4" (Eq. 3-4,
    max |Act| over every real token) or "released" (the authors' code, see baselines.released_scores)."""
    if rule == "eq4":
        return list(score_pass(model, batches, layer_rule=None)["neuron"])
    return list(baselines.released_rule(model, batches, None, top_n))


def layer_scores(model, batches, *, rule: str = "distance") -> torch.Tensor:
    """(num_layers,) mean over real tokens of Eq. 5 ("distance") or ShortGPT's Block Influence ("bi")."""
    return score_pass(model, batches, neurons=False, layer_rule=rule)["layer"]


# ----------------------------------------------------------------------------- surgery


@torch.no_grad()
def prune_neurons(model: nn.Module, keep: list[torch.Tensor]) -> None:
    """Keep only neurons keep[l] of layer l's FFN (rows of gate/up, columns of down), in place.

    keep: per layer a 1-D LongTensor of indices, all of one length (config.intermediate_size follows)."""
    layers = decoder_layers(model)
    width = ffn(layers[0])[0].out_features
    if len(keep) != len(layers):
        raise ValueError(f"keep has {len(keep)} entries for {len(layers)} layers")
    if len({len(k) for k in keep}) != 1:
        raise ValueError("every layer must keep the same number of neurons (an HF config has one intermediate_size)")
    if len(keep[0]) == 0:
        raise ValueError("refusing to remove every neuron of every layer: keep at least one")
    for l, k in enumerate(keep):
        if k.unique().numel() != k.numel() or k.min() < 0 or k.max() >= width:
            raise ValueError(f"keep[{l}] must hold distinct indices in [0, {width})")
    for layer, k in zip(layers, keep):
        for lin, dim in zip(ffn(layer), (0, 0, 1)):  # gate/up: output rows; down: input columns
            k = k.to(lin.weight.device)
            lin.weight = nn.Parameter(lin.weight.index_select(dim, k), lin.weight.requires_grad)
            if dim == 0 and lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias[k], lin.bias.requires_grad)
            setattr(lin, "out_features" if dim == 0 else "in_features", len(k))
    model.config.intermediate_size = len(keep[0])


PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


@torch.no_grad()
def drop_layers(model: nn.Module, drop: list[int]) -> None:
    """Remove decoder layers `drop` (current numbering) in place; renumber layer_idx (the KV cache slot of
    each attention) and shrink the config's per-layer lists so sliding/full attention stays with its layer."""
    layers, cfg = decoder_layers(model), model.config
    L, drop = len(layers), sorted({int(i) for i in drop})
    if any(i < 0 or i >= L for i in drop):
        raise ValueError(f"layer indices {drop} out of range [0, {L})")
    if len(drop) >= L:
        raise ValueError(f"refusing to remove all {L} layers: keep at least one")
    if getattr(cfg, "slicegpt", None):  # layer l's output is in the basis layer l + 1 reads: no layer can go
        raise ValueError("a SliceGPT model's layers each work in their own basis, chained by the shortcuts: removing "
                         "one would break the chain. Remove neurons only, or remove layers before slicing")
    unknown = [k for k, v in cfg.to_dict().items()
               if "layer" in k and isinstance(v, list) and len(v) == L and k not in PER_LAYER_CONFIG]
    if unknown:
        raise ValueError(f"do not know how to update config.{unknown} when dropping layers; please report this")
    kept = [i for i in range(L) if i not in drop]
    model.base_model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_i, layer in enumerate(model.base_model.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    for k in PER_LAYER_CONFIG:
        if getattr(cfg, k, None) is not None:
            setattr(cfg, k, [getattr(cfg, k)[i] for i in kept])
    if isinstance(getattr(cfg, "max_window_layers", None), int):  # Qwen: layers below it use full attention
        cfg.max_window_layers = sum(i < cfg.max_window_layers for i in kept)
    cfg.num_hidden_layers = len(kept)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Config:
    """Prune-Tune Loop (Algorithm 1): score, remove, recover, save - round after round."""
    model: str = flag(DEFAULT_MODEL, "smollm2-135m (offline), a checkpoint dir or a hub name")
    out: str = flag("out/ptl", "writes OUT/round_<t>/; re-running resumes")
    calib_data: str = flag("offline", "comma-separated: offline | .jsonl/.parquet | hub names (paper: "
                                      "AI-MO/NuminaMath-CoT,meta-math/MetaMathQA)")
    calib_samples: int = flag(128, "calibration texts each round scores on")
    max_length: int = flag(512, "tokens per calibration text (longer ones are cut)")
    batch_size: int = flag(8, "calibration texts per forward pass")
    order: Literal["neu-lay", "lay-neu", "alternate"] = flag("neu-lay", "Table 3")
    rounds: int = flag(0, "max rounds T (0: until the targets are met)")
    target_ratio: float = flag(0.4, "fraction of all parameters to remove (0: no size target)")
    layer_target: int = flag(0, "layers to remove in all (counted in --target-ratio)")
    neuron_step: float = flag(0.05, "neurons per layer and round, fraction of the original width (Fig. 4)")
    layer_step: int = flag(1, "layers per layer-round")
    sigma_neuron: float | None = flag(None, "Eq. 4 threshold; sets k per round instead of --neuron-step")
    sigma_layer: float | None = flag(None, "Eq. 6 threshold; sets the layers per round")
    neuron_rule: Literal["eq4", "released", "taylor"] = flag(
        "eq4", "eq4: max |Act| over tokens (the paper); released: the authors' code; taylor: LLM-Pruner's importance")
    taylor_variant: Literal["element", "vector"] = flag("element", "--neuron-rule taylor: LLM-Pruner's element-wise "
                                                                   "(param_first) or vector-wise (vectorize) score")
    layer_rule: Literal["distance", "bi", "ppl", "taylor"] = flag(
        "distance", "Eq. 5; ShortGPT's Block Influence; perplexity change with the layer removed; first-order Taylor")
    released_top_n: str = flag("0.84", "released rule: n of the bottom-n per round, comma-separated, the last "
                                       "repeating; < 1 a fraction of the width, else a count (docs/usage.md)")
    calib_per_round: bool = flag(False, "fresh calibration texts (and --protect-data lines) every round: round t "
                                        "reads rows (t-1)n .. tn, as the authors do")
    protect_data: str = flag("", "general-text corpus whose strongly active neurons are never pruned")
    protect_samples: int = flag(0, "lines of --protect-data to probe (0: all)")
    protect_frac: float = flag(0.1, "eq4 rule: protect each layer's top fraction on --protect-data")
    recovery: Literal["none", "cpt", "grpo", "cpt+grpo"] = flag(
        "none", "Algorithm 1 lines 9-10 after each round: recover.py (cpt), grpo.py, or both in that order")
    cpt_flags: str = flag(
        "--data offline --samples 64 --max-length 256 --global-batch 8 --micro-batch 4 --lr 1e-4",
        "recover.py flags for every round; --samples is texts per round (round t trains on rows (t-1)*samples .. "
        "t*samples); the default suits the default model on a CPU, the paper's is in docs/usage.md")
    recovery_schedule: Literal["per-round", "continuous"] = flag(
        "per-round", "per-round: each round's recovery is its own run (the paper's loop); continuous: one recover.py "
                     "run over every round's texts, a window per round, AdamW's moments carried across the cuts")
    grpo_flags: str = flag("", "grpo.py flags for every round, e.g. '--data hiyouga/math12k --samples 1200'; round t "
                               "uses prompts (t-1)*samples .. t*samples")
    eval_every_round: bool = flag(False, "evaluate the dense model and every round with evaluate.py; results in "
                                         "dense_eval.json and ptl_record.json")
    eval_flags: str = flag(
        "--tasks offline --limit 100 --metrics gold_logprob,accuracy --max-new-tokens 200 --batch-size 100",
        "evaluate.py flags (default: held-out offline problems, which need no hub), e.g. '--tasks gsm8k,math500 "
        "--data-dir ../shared/data --limit 100'")
    baseline: Literal["none", "prune-once", "shortgpt", "slicegpt"] = flag(
        "none", "one round down to PTL's final shape (prune-once), of lowest-BI layers (shortgpt) or of the hidden "
                "size (slicegpt); docs/usage.md")
    apply_removal: str = flag("", "a finished round of another run: remove, in one round and without scoring, every "
                                  "layer and neuron that run had removed by then")
    dtype: Literal["auto", "float32", "bfloat16"] = flag("auto", "weights while scoring; auto: bf16 on CUDA, fp32 on "
                                                                 "CPU and whenever a recovery trains")
    device: str = flag("auto", "auto (CUDA if present), cpu, cuda, cuda:1, ...")
    seed: int = flag(0, "which calibration texts are drawn (and --protect-data lines)")

    def __post_init__(self):
        self.model = same_path(self.model)
        check_ranges(self, positive=("calib_samples", "max_length", "batch_size"),
                     non_negative=("rounds", "protect_samples", "layer_target", "sigma_neuron", "sigma_layer"))
        sized = self.target_ratio or (self.baseline == "prune-once" and self.layer_target)
        if self.baseline != "none" and not sized:
            raise ValueError(f"--baseline {self.baseline} removes everything in one round: it needs a size, "
                             "--target-ratio")
        if not 0 < self.neuron_step <= 1 or not 0 <= self.target_ratio < 1:
            raise ValueError("need 0 < --neuron-step <= 1 and 0 <= --target-ratio < 1")
        try:
            tops = self.top_ns()
        except ValueError:
            tops = []
        if not tops or any(not (0 < x < 1 or (x >= 1 and x == int(x))) for x in tops):
            raise ValueError(f"--released-top-n {self.released_top_n!r}: give fractions in (0, 1) or whole counts, "
                             "comma-separated, one per round (e.g. 0.84, or 12000,12000,11000,10000)")
        if self.calib_per_round and self.protect_data and not self.protect_samples:
            raise ValueError("--calib-per-round takes fresh --protect-data lines each round: give --protect-samples")
        if self.layer_step < 1 or self.layer_target < 0 or not 0 <= self.protect_frac < 1:
            raise ValueError("need --layer-step >= 1, --layer-target >= 0 and 0 <= --protect-frac < 1")
        if not (self.rounds or self.target_ratio or self.sigma_neuron is not None or self.sigma_layer is not None):
            raise ValueError("nothing bounds the loop: give --rounds, --target-ratio or a sigma threshold")
        ignored = [f"--{k.replace('_', '-')}" for k in baselines.ignored_flags(self)
                   if getattr(self, k) != FIELDS[k].default]
        if ignored:
            mode = "--apply-removal" if self.apply_removal else f"--baseline {self.baseline}"
            raise ValueError(f"{mode} removes everything in one round: {', '.join(ignored)} would be ignored; drop it")
        if self.recovery_schedule == "continuous" and (self.recovery != "cpt" or not (
                self.target_ratio or self.apply_removal) or {self.sigma_neuron, self.sigma_layer} != {None}):
            raise ValueError("--recovery-schedule continuous spans one recover.py schedule over a number of rounds "
                             "known at the start: it needs --recovery cpt and --target-ratio, without sigma thresholds")
        if self.apply_removal:
            if self.baseline != "none":
                raise ValueError(f"--apply-removal and --baseline {self.baseline} each choose what to remove: give one")
            baselines.read_plan(self.apply_removal)  # a missing or unreadable plan now, before any model loads
        check_read(self, READS)
        check_out(self.out, self.model)
        check_sources(self.calib_data, "--calib-data"), check_sources(self.protect_data, "--protect-data")
        self.flags_for("cpt"), self.flags_for("grpo")  # refuse bad recovery flags now, not after round 1's scoring
        if self.eval_every_round:
            import_evaluate().parse_config_of(self.eval_flags, within="--eval-flags").task_list()

    def flags_for(self, kind: str):
        """recover.py's (kind "cpt") or grpo.py's Config from --cpt-flags / --grpo-flags; None if not recovering so."""
        if kind not in self.recovery.split("+"):
            return None
        import grpo

        rc = parse_config({"cpt": recover, "grpo": grpo}[kind].Config, shlex.split(getattr(self, f"{kind}_flags")),
                          within=f"--{kind}-flags")
        if not rc.samples:
            raise ValueError(f"--recovery {kind} needs a data size per round: --{kind}-flags '--samples N ...'")
        return rc

    def top_ns(self) -> list[float]:
        return [float(x) for x in self.released_top_n.split(",")]

    def top_n(self, t: int) -> float:
        """The released rule's n in round t (1-based): the t-th value of --released-top-n, or its last."""
        tops = self.top_ns()
        return tops[min(t, len(tops)) - 1]


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Flags that only some modes read: set away from its default in another mode, a flag is refused (check_read).
READS = {
    "taylor_variant": (lambda c: c.neuron_rule == "taylor", "with --neuron-rule taylor"),
    "released_top_n": (lambda c: c.neuron_rule == "released", "with --neuron-rule released"),
    "protect_samples": (lambda c: bool(c.protect_data), "with --protect-data"),
    "protect_frac": (lambda c: bool(c.protect_data) and c.neuron_rule != "released",
                     "with --protect-data and --neuron-rule eq4 or taylor (released protects its own top-n)"),
    "neuron_step": (lambda c: c.sigma_neuron is None, "without --sigma-neuron, which sets each round's count"),
    "layer_step": (lambda c: c.sigma_layer is None, "without --sigma-layer, which sets each round's count"),
    "calib_per_round": (lambda c: c.baseline == "none" and not c.apply_removal, "in PTL's rounds, not a one-cut run"),
    "cpt_flags": (lambda c: "cpt" in c.recovery.split("+"), "with --recovery cpt or cpt+grpo"),
    "grpo_flags": (lambda c: "grpo" in c.recovery.split("+"), "with --recovery grpo or cpt+grpo"),
    "eval_flags": (lambda c: c.eval_every_round, "with --eval-every-round"),
}
RESUMABLE = {"rounds", "device", "eval_every_round", "eval_flags", "out"}  # may change when a run is resumed


def neuron_budget(model, cfg: Config) -> int | None:
    """Neurons per layer to remove in all: solved exactly so that after --layer-target layers go, the model
    has <= (1 - target_ratio) of its parameters. None = no size target (rounds or sigma bound the loop)."""
    if not cfg.target_ratio:
        return None
    layers = decoder_layers(model)
    gate, up, down = ffn(layers[0])
    L, I = len(layers), gate.out_features
    per_neuron = gate.in_features + up.in_features + down.out_features + (gate.bias is not None) + (up.bias is not None)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    P = count_params(model)["total"]
    rest, L_end = P - L * per_layer, L - cfg.layer_target
    if L_end < 1:
        raise ValueError(f"--layer-target {cfg.layer_target} would remove all {L} layers")
    budget = (1 - cfg.target_ratio) * P - rest - L_end * (per_layer - I * per_neuron)  # for the FFN neurons
    width = math.floor(budget / (L_end * per_neuron))
    if width < 1:
        raise ValueError(f"--target-ratio {cfg.target_ratio} is out of reach: it would remove every FFN neuron")
    return max(0, I - width)


def neuron_schedule(total: int, step: int) -> list[int]:
    """Neurons per layer that each neuron round removes: `step` at a time until `total` are gone, and a remainder
    under half a step joins the last round (a round of its own would spend a whole recovery on a sliver)."""
    rounds = []
    while total > 0:
        rounds.append(total if total - step < step / 2 else step)
        total -= rounds[-1]
    return rounds


def next_kind(order: str, t: int, left: dict) -> str | None:
    """The kind of round t (1-based) given what is left; None when nothing is. order "once" (the baselines)
    removes every kind that is left in one round."""
    can = {k: v is None or v > 0 for k, v in left.items()}
    if order == "once":
        return "once" if any(can.values()) else None
    first = {"neu-lay": "neurons", "lay-neu": "layers", "alternate": "neurons" if t % 2 else "layers"}[order]
    second = "layers" if first == "neurons" else "neurons"
    return first if can[first] else second if can[second] else None


@dataclass
class LoopState:
    """What the loop knows between rounds; every round's record holds it, so a re-run resumes from it."""
    round: int  # rounds finished
    dense: dict  # the dense model: params, num_hidden_layers, intermediate_size, hidden_size
    left: dict  # still to remove: "neurons" per layer, "layers" (SliceGPT: "width"); None: no target, a sigma decides
    kept_layers: list[int] = dataclasses.field(default_factory=list)  # dense indices of the layers the model holds
    kept_neurons: list[list[int]] = dataclasses.field(default_factory=list)  # per kept layer, its neurons (dense)

    @classmethod
    def start(cls, model, cfg: Config) -> LoopState:
        """Round 0 of a run on `model`: all of it kept, and what the targets (or a one-cut method) will remove."""
        L, I = model.config.num_hidden_layers, model.config.intermediate_size
        if cfg.layer_target >= L:
            raise ValueError(f"--layer-target {cfg.layer_target} would remove all {L} layers")
        if cfg.neuron_rule == "released":  # round 1's n, now rather than after its calibration pass
            baselines.top_count(cfg.top_n(1), I)
        left = baselines.one_cut_left(model, cfg) or {  # else PTL's budget (None: unbounded, a sigma decides)
            "neurons": neuron_budget(model, cfg),
            "layers": cfg.layer_target or (None if cfg.sigma_layer is not None else 0)}
        dense = {"params": count_params(model), "num_hidden_layers": L, "intermediate_size": I,
                 "hidden_size": model.config.hidden_size}
        return cls(0, dense, left, list(range(L)), [list(range(I)) for _ in range(L)])


def resume_or_start(cfg: Config, d) -> tuple:
    """(model, tokenizer, LoopState) after the last finished round in OUT, or the dense model and round 0."""
    out = Path(cfg.out)
    dtype = "float32" if cfg.recovery != "none" and cfg.dtype == "auto" else cfg.dtype  # training: fp32 masters
    done = finished_rounds(out)
    path = out / f"round_{done[-1]}" if done else None
    if path:
        rec = load_record(path)
        if changed := settings_changed(rec["config"], asdict(cfg), RESUMABLE):
            raise ValueError(f"{out} holds a run made with other settings {changed} (old, new); "
                             "repeat its flags to resume, or use another --out")
    model, tok = load_model(str(path or cfg.model), dtype=dtype, device=d.device)
    check_supported(model)
    if not path:
        return model, tok, LoopState.start(model, cfg)
    print0(f"resuming {out} after round {done[-1]}")
    return model, tok, LoopState(**{f.name: rec[f.name] for f in dataclasses.fields(LoopState)})


def round_scores(model, calib, protect, cfg: Config, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(neuron (L, I), layer (L,)) scores of the current model before round t, lower = more redundant, with language
    protection. Eq. 4 and a per-token layer metric share one hooked pass; other criteria take their own passes."""
    eq4, hooked = cfg.neuron_rule == "eq4", cfg.layer_rule in LAYER_METRICS
    r = score_pass(model, calib, neurons=eq4, layer_rule=cfg.layer_rule if hooked else None) if eq4 or hooked else {}
    s = r["neuron"] if eq4 else baselines.NEURON_CRITERIA[cfg.neuron_rule](model, calib, protect, cfg, t)
    if protect is not None and cfg.neuron_rule not in baselines.PROTECTS_ITSELF:  # the general text's most active
        general = score_pass(model, protect, layer_rule=None)["neuron"]  # neurons (Eq. 4 on it) are never pruned
        s = baselines.protect_top(s.to(general.device), general, cfg.protect_frac)
    lay = r["layer"] if hooked else baselines.LAYER_CRITERIA[cfg.layer_rule](model, calib)
    return s.cpu(), lay.cpu()


def recover_round(model, tok, cfg: Config, t: int, work: Path, rounds: int, moments: dict | None):
    """Algorithm 1 lines 9-10: continual pre-training (recover.py) and/or GRPO (grpo.py) of the just-pruned
    model, in that order, each on round t's own slice of its data (the paper partitions its corpora so that
    no round repeats data). --recovery-schedule continuous: round t trains window t/rounds of one recover.py run
    over every round's texts, AdamW starting from `moments`. -> (model, {"cpt": summary, "grpo": summary}, AdamW's
    moments at the end when continuous, else None)"""
    import grpo

    summaries, continuous = {}, cfg.recovery_schedule == "continuous"  # cpt only (Config refuses the rest)
    for kind in cfg.recovery.split("+"):
        module = {"cpt": recover, "grpo": grpo}[kind]
        rc = cfg.flags_for(kind)
        if continuous:
            rc = replace(rc, samples=rounds * rc.samples, max_steps=rounds * rc.max_steps, window=f"{t}/{rounds}")
        else:
            rc = replace(rc, data_offset=(t - 1) * rc.samples)
        rc = replace(rc, out=str(work / kind), device=cfg.device)
        data = (load_texts if kind == "cpt" else load_qa)(rc.data, n=rc.samples, seed=rc.seed, offset=rc.data_offset)
        result = module.train(model, tok, data, rc, **({"moments": moments} if continuous else {}))
        model, carried = result.pop("model"), result.pop("moments", None)
        summaries[kind] = {"data": rc.data, "rows": [rc.data_offset, rc.data_offset + rc.samples], **result}
    return model, summaries, carried if continuous else None


def removal(kind: str, s_neu: torch.Tensor, s_lay: torch.Tensor, cfg: Config, state: LoopState):
    """What the next round removes: per layer the indices of k neurons, or a list of layers; None when a
    sigma threshold finds nothing redundant. Refuses (before any change) to remove every neuron or layer."""
    t, left = state.round + 1, state.left[kind]
    if kind == "neurons":
        L, I = s_neu.shape
        step = max(1, round(cfg.neuron_step * state.dense["intermediate_size"]))
        if cfg.sigma_neuron is not None:
            k = uniform_count(s_neu, cfg.sigma_neuron)
            k = k if left is None else min(k, left)
        else:
            k = step if left is None else (neuron_schedule(left, step) or [0])[0]
        if k >= I:
            raise ValueError(f"round {t} would remove all {I} neurons of each layer; lower --neuron-step, "
                             "--sigma-neuron or --target-ratio")
        removed = [lowest(s_neu[l], k) for l in range(L)]
        if any(s_neu[l, r].isinf().any() for l, r in enumerate(removed)):
            raise ValueError(f"round {t} must remove {k} neurons per layer, but a layer has fewer unprotected ones")
        return removed if k else None
    L = len(s_lay)
    n = len(redundant_layers(s_lay, cfg.sigma_layer)) if cfg.sigma_layer is not None else cfg.layer_step
    n = n if left is None else min(n, left)
    if n >= L:
        raise ValueError(f"round {t} would remove all {L} layers; lower --sigma-layer")
    return sorted(lowest(s_lay, n).tolist()) if n else None


def apply_removal(model, kind: str, what, state: LoopState) -> dict:
    """Remove `what` from the model and from the state's bookkeeping; the round's record (original numbering)."""
    kl, kn = state.kept_layers, state.kept_neurons
    if kind == "neurons":
        I = len(kn[0])
        keep = [torch.tensor(sorted(set(range(I)) - set(r.tolist()))) for r in what]
        rec = {"removed_neurons": {kl[l]: sorted(kn[l][j] for j in r.tolist()) for l, r in enumerate(what)},
               "removed_layers": [], "neurons_per_layer": len(what[0])}
        prune_neurons(model, keep)
        state.kept_neurons = [[kn[l][j] for j in k.tolist()] for l, k in enumerate(keep)]
    else:
        rec = {"removed_neurons": {}, "removed_layers": [kl[i] for i in what], "neurons_per_layer": 0}
        drop_layers(model, what)
        state.kept_layers = [x for i, x in enumerate(kl) if i not in what]
        state.kept_neurons = [x for i, x in enumerate(kn) if i not in what]
    if state.left[kind] is not None:
        state.left[kind] -= len(what[0]) if kind == "neurons" else len(what)
    return rec


def apply_plan(model, plan: dict, state: LoopState) -> dict:
    """Remove, in one round, every neuron and layer that `plan` does not keep. -> the round's record."""
    rec = None
    for kind, what in baselines.plan_cuts(plan, state.left, state.kept_layers, state.kept_neurons):
        r = apply_removal(model, kind, what, state)
        rec = r if rec is None else {**rec, "removed_layers": r["removed_layers"]}
    return rec


def rounds_left(cfg: Config, left: dict, dense_width: int) -> int:
    """How many more rounds the loop will run, from what is left to remove (a target, no sigma thresholds)."""
    if cfg.baseline != "none" or cfg.apply_removal:
        return int(any(left.values()))
    step = max(1, round(cfg.neuron_step * dense_width))
    return len(neuron_schedule(left["neurons"] or 0, step)) + math.ceil((left["layers"] or 0) / cfg.layer_step)


def last_round(cfg: Config, state: LoopState) -> int | None:
    """The round the loop will end with, where it is known at the start (--rounds, or a size target without
    sigma thresholds); None where a threshold decides."""
    planned = [cfg.rounds] if cfg.rounds else []
    if cfg.target_ratio and cfg.sigma_neuron is None and cfg.sigma_layer is None:
        planned.append(state.round + rounds_left(cfg, state.left, state.dense["intermediate_size"]))
    return min(planned) if planned else None


def prune_round(model, kind: str, s_neu: torch.Tensor, s_lay: torch.Tensor, cfg: Config,
                state: LoopState) -> dict | None:
    """Algorithm 1 line 7: remove what this round's scores mark (neurons, layers, or with a baseline both at
    once) from the model and the state; the round's record, or None when nothing is redundant any more."""
    rec = None
    for k in ("neurons", "layers") if kind == "once" else (kind,):  # layer indices are unchanged by neurons
        what = removal(k, s_neu, s_lay, cfg, state)
        if what is None:  # Eq. 4 / Eq. 6 find nothing under sigma (or nothing is left): this kind is done
            state.left[k] = 0
            continue
        r = apply_removal(model, k, what, state)
        rec = r if rec is None else {**rec, "removed_layers": r["removed_layers"]}
    return rec


def cut(model, kind: str, calib_protect, rcfg: Config, state: LoopState, t: int) -> tuple[dict | None, dict]:
    """Algorithm 1 lines 4-7 (or a baseline's one cut): score, and remove what the scores mark. -> (the round's record
    with its score summary, or None when nothing is redundant any more; the tensors for scores.safetensors).
    calib_protect() -> (calibration batches, --protect-data batches or None), read only when scoring."""
    if rcfg.apply_removal:  # a plan from a file: nothing is scored
        return apply_plan(model, baselines.read_plan(rcfg.apply_removal), state), {}
    calib, protect = calib_protect()
    if state.left.get("width"):  # SliceGPT: one cut of the hidden size
        width, state.left["width"] = model.config.hidden_size - state.left["width"], 0
        return slice_round(model, calib, width)
    s_neu, s_lay = round_scores(model, calib, protect if kind != "layers" else None, rcfg, t)  # lines 4-6
    rec = prune_round(model, kind, s_neu, s_lay, rcfg, state)  # line 7
    if rec is not None:
        rec["scores"] = score_summary(s_neu, s_lay, rec["neurons_per_layer"])
    return rec, {"neuron_scores": s_neu, "layer_scores": s_lay}


def main(cfg: Config) -> dict:
    """Algorithm 1: while the targets are not met (line 2), score (lines 4-6) and remove (line 7) what is redundant,
    recover (lines 9-10), and save the round; a re-run resumes after the last saved round."""
    d = setup_dist(cfg.device)
    out = prepare_out(Path(cfg.out), d)
    model, tok, state = resume_or_start(cfg, d)
    calibration = calibration_texts(cfg, tok, d)
    calibration.check(last_round(cfg, state))
    dense_eval = dense_evaluation(model, tok, cfg, out, state) if cfg.eval_every_round else None
    order = "once" if cfg.apply_removal or cfg.baseline != "none" else cfg.order  # one-cut methods: one round
    rcfg = baselines.one_cut_rule(cfg) if cfg.baseline != "none" else cfg  # the rule that rounds apply
    moments = trainer.load_moments(out / f"round_{state.round}" / "moments.safetensors") if state.round else None
    records = []
    while (kind := next_kind(order, state.round + 1, state.left)) and state.round < (cfg.rounds or math.inf):
        t, t0, before = state.round + 1, time.time(), count_params(model)
        kept = copy.deepcopy(state)  # the units before the cut, for the moments
        rec, tensors = cut(model, kind, functools.partial(calibration, t), rcfg, state, t)  # lines 4-7
        if rec is None:  # nothing of this kind is redundant any more
            continue
        if moments is not None:  # continuous schedule: AdamW goes on with what the cut kept
            moments = trainer.carry_moments(moments, model, kept, state)
        state.round = t
        model, moments = recover_and_evaluate(model, tok, cfg, rec, state, moments)  # lines 9-10
        once = "plan" if cfg.apply_removal else cfg.baseline  # the one-round kinds
        rec.update(copy.deepcopy(asdict(state)), calibration={"data": cfg.calib_data, "rows": calibration.rows(t)},
                   kind=once if kind == "once" else kind, params_before=before, params_after=count_params(model),
                   layer_rule=rcfg.layer_rule, time_s=time.time() - t0, config=asdict(cfg))
        save_round(out, model, tok, rec, tensors, moments)
        records.append(rec)
        print0(round_line(rec, model))
    result = run_result(out, model, state, records, dense_eval, cfg)
    cleanup_dist()
    return result


def recover_and_evaluate(model, tok, cfg: Config, rec: dict, state: LoopState, moments: dict | None) -> tuple:
    """Round t's recovery (with --eval-every-round, the evaluations before and after it) into its record.
    -> (the recovered model, AdamW's moments to carry on with, or None)"""
    t, evaluate = state.round, functools.partial(import_evaluate().evaluate_with, flags=cfg.eval_flags,
                                                 device=cfg.device)
    if cfg.eval_every_round and cfg.recovery != "none":
        rec["eval_pruned"] = evaluate(model, tok)  # the damage, before recovery repairs it
    if cfg.recovery != "none":
        rounds = t + rounds_left(cfg, state.left, state.dense["intermediate_size"])
        model, rec["recovery"], moments = recover_round(model, tok, cfg, t, work_dir(Path(cfg.out), t), rounds,
                                                           moments)
    if cfg.eval_every_round:
        rec["eval"] = evaluate(model, tok)
    return model, moments


def work_dir(out: Path, t: int) -> Path:
    """Round t's resumable recovery state; removed once the round is saved."""
    return out / f".recovery_round_{t}"


def save_round(out: Path, model, tok, rec: dict, tensors: dict, moments: dict | None) -> None:
    """OUT/round_<t>: the checkpoint, ptl_record.json, the scores (and AdamW's moments), the recovery metrics."""
    work = work_dir(out, rec["round"])
    save_checkpoint(out / f"round_{rec['round']}", model, tok, json_files={"ptl_record.json": rec},
                    tensors={"scores.safetensors": tensors,
                             **({"moments.safetensors": trainer.flat_moments(moments)} if moments else {})},
                    copies={f"{k}_metrics.jsonl": work / k / "metrics.jsonl" for k in rec.get("recovery", {})})
    if is_main():
        shutil.rmtree(work, ignore_errors=True)


def dense_evaluation(model, tok, cfg: Config, out: Path, state: LoopState) -> dict | None:
    """The dense row of the report (round 0): evaluated at the start of a run into dense_eval.json, read back
    when a run resumes (None if a run made without --eval-every-round resumes with it)."""
    path = out / "dense_eval.json"
    if state.round == 0 and not path.exists():
        res = import_evaluate().evaluate_with(model, tok, cfg.eval_flags, cfg.device)
        if is_main():
            atomic_write_json(path, res)
        print0(summary_line("dense", res))
        return res
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    unshadow_evaluate()  # lm-eval tasks that `import evaluate` must get Hugging Face's, not our evaluate.py
    run_cli(main, Config)
