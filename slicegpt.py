"""SliceGPT (Ashkboos et al., 2024), the width baseline of Table 1 (`ptl.py --baseline slicegpt`): one cut that
narrows the residual stream instead of the FFN, and the model class and loader of its checkpoints.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ptl_common import (all_reduce_, atomic_write_json, count_params, decoder_layers, ffn, hidden_in, is_main,
                        unsupported)

# ----------------------------------------------------------------------------- slicing
# The width baseline of Table 1: one cut that narrows the residual stream instead of the FFN. Once every RMSNorm's
# scale is folded into the linear layers that read it, RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q, so each
# point of the residual stream may be expressed in its own basis; in the PCA basis of the signal there, the last
# directions carry the least energy and are sliced off. The shortcuts (sliced_forward) carry the stream
# from one basis to the next. As released (microsoft/TransformerCompression), the bases are computed sequentially,
# each on the signals of the model as already sliced, and every width is the same d' (the LM head's too).


SLICEABLE = ("llama", "mistral", "qwen2", "qwen3")



def attention(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """(q_proj, k_proj, v_proj, o_proj) of a decoder layer's self-attention."""
    parts = tuple(getattr(getattr(layer, "self_attn", None), n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise unsupported(layer, "its layers have no self_attn.q_proj/k_proj/v_proj/o_proj Linear modules")
    return parts



def check_sliceable(model: nn.Module) -> None:
    """SliceGPT needs pre-norm blocks: one RMSNorm before attention, one before the MLP, one before the LM head, each
    x / rms(x) * g with a scale g that the next linear layer can absorb."""
    kind = model.config.model_type
    if getattr(model.config, "slicegpt", None):
        raise ValueError("--baseline slicegpt: this model is already sliced; start from the dense checkpoint")
    if kind not in SLICEABLE:
        raise ValueError(f"--baseline slicegpt supports {', '.join(SLICEABLE)} (pre-norm blocks whose RMSNorm scales "
                         f"fold into the next linear layer), not {kind!r}" + (
                             ": Gemma2 also normalises each branch's output before the residual add "
                             "(post_attention_layernorm, post_feedforward_layernorm), a scale no linear layer can "
                             "absorb, and its norms scale by 1 + g" if kind.startswith("gemma") else ""))
    for layer in decoder_layers(model):
        attention(layer), ffn(layer)



def pca_basis(C: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SliceGPT's PCA: Q = the eigenvectors of C = sum_x x^T x (x (1, d) the signal at one point of the residual
    stream, over every calibration token), by decreasing eigenvalue, so that x Q[:, :d'] keeps more of the signal's
    energy than any other d' orthonormal directions. The diagonal is damped by damp x its mean, as released.
    C (d, d) fp64 -> (eigenvalues (d,), Q (d, d))"""
    C = C + damp * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype, device=C.device)
    val, vec = torch.linalg.eigh(C)
    order = val.argsort(descending=True)
    return val[order], vec[:, order]



def signal_covariance(xs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """C = sum over the real tokens of every batch of x^T x, summed over torchrun ranks. xs: (B, T, d) per batch,
    masks: (B, T) bool. -> (d, d) fp64"""
    C = sum(x[m].double().T @ x[m].double() for x, m in zip(xs, masks))
    return all_reduce_(C.contiguous())



@torch.no_grad()
def rotate(module: nn.Module, P: torch.Tensor, side: str) -> None:
    """Express a module in a new basis P (d, d') of the residual stream: a linear layer that reads the stream
    (side "in": W (out, d) -> W P) or writes it (side "out": W (d, in) -> P^T W, b -> b P); an embedding's rows are
    stream vectors (E (V, d) -> E P). Computed in fp64, stored in the module's dtype."""
    w = module.weight
    new = (w.double() @ P if side == "in" else P.T @ w.double()).to(w.dtype)
    module.weight = nn.Parameter(new, requires_grad=w.requires_grad)
    if side == "out" and module.bias is not None:
        module.bias = nn.Parameter((module.bias.double() @ P).to(w.dtype), requires_grad=module.bias.requires_grad)
    if isinstance(module, nn.Embedding):
        module.embedding_dim = P.shape[1]
    else:
        setattr(module, "in_features" if side == "in" else "out_features", P.shape[1])



@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Fold each RMSNorm's scale g into the linear layers that read it (W <- W diag(g)), the final norm's into the LM
    head (untied from the embeddings first), and set every g to 1: the function is unchanged, and every norm is now
    x / rms(x), which commutes with an orthogonal rotation."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    pairs = [(model.base_model.norm, [head])]
    for layer in decoder_layers(model):
        pairs += [(layer.input_layernorm, attention(layer)[:3]), (layer.post_attention_layernorm, ffn(layer)[:2])]
    for norm, readers in pairs:
        for lin in readers:
            lin.weight.copy_(lin.weight.double() * norm.weight.double())
        norm.weight.fill_(1)



@torch.no_grad()
def narrow_norm(norm: nn.Module, width: int, dense: int) -> None:
    """A folded RMSNorm over width d' that computes SliceGPT's RMSN over the dense width d: x / sqrt(|x|^2 / d + eps)
    = g x / sqrt(|x|^2 / d' + eps') with g = sqrt(d / d') and eps' = eps d / d' (the stock module, exactly)."""
    norm.weight = nn.Parameter(norm.weight.new_full((width,), math.sqrt(dense / width)))
    norm.variance_epsilon *= dense / width



@torch.no_grad()
def block_inputs(model: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[dict]], list]:
    """(layer 0's input per batch (B, T, d), kws[l][i]: the other arguments layer l is called with on batch i (its
    causal or sliding-window mask, rotary position embeddings, ...), the real-token masks (B, T) bool), from one
    forward pass of each batch."""
    dev, xs, masks = next(model.parameters()).device, [], []
    layers = decoder_layers(model)
    kws: list[list[dict]] = [[] for _ in layers]

    def grab(l):
        def fn(mod, args, kwargs):
            if l == 0:
                xs.append(hidden_in(args, kwargs))
            kws[l].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return fn

    handles = [layer.register_forward_pre_hook(grab(l), with_kwargs=True) for l, layer in enumerate(layers)]
    try:
        for b in batches:
            b = {k: v.to(dev) for k, v in b.items()}
            masks.append(b["attention_mask"].bool())
            model.base_model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return xs, kws, masks



class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""



def run_layer(layer: nn.Module, xs: list[torch.Tensor], kws: list[dict], tap: nn.Module | None = None) -> list:
    """The layer's outputs on each batch, or with `tap`, the inputs of that submodule (the pass stops there)."""
    got = []

    def grab(mod, args):
        got.append(args[0])
        raise _Stop

    handle = tap.register_forward_pre_hook(grab) if tap is not None else None
    try:
        for x, kw in zip(xs, kws):
            try:
                out = layer(x, **kw)
                got.append(out[0] if isinstance(out, tuple) else out)
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    return got



@torch.no_grad()
def slice_block(layer: nn.Module, xs: list, kws: list, masks: list, P: torch.Tensor, dense: int) -> tuple:
    """SliceGPT on one decoder layer, whose inputs xs (B, T, d') are the previous output in basis P (d, d'):
    1. attention reads basis P: W_qkv <- W_qkv P; the residual is carried back by the shortcut P^T (d', d);
    2. the PCA of the signal entering the MLP gives M (d, d'): W_o <- M^T W_o, W_gate/up <- W M, S_attn = P^T M;
    3. the PCA of the layer's output gives N (d, d'): W_down <- N^T W_down, S_mlp = M^T N.
    -> (the outputs in basis N (B, T, d'), N, the eigenvalues of both PCAs (2, d))"""
    (q, k, v, o), (gate, up, down) = attention(layer), ffn(layer)
    width, as_w = P.shape[1], (lambda m: nn.Parameter(m.to(q.weight.dtype)))
    for lin in (q, k, v):
        rotate(lin, P, "in")
    narrow_norm(layer.input_layernorm, width, dense)
    layer.attn_shortcut, layer.mlp_shortcut = as_w(P.T), as_w(torch.eye(dense, dtype=P.dtype, device=P.device))
    layer.__class__ = sliced_class(type(layer))
    val_mid, Q = pca_basis(signal_covariance(run_layer(layer, xs, kws, tap=layer.post_attention_layernorm), masks))
    M = Q[:, :width]
    layer.attn_shortcut, layer.mlp_shortcut = as_w(P.T @ M), as_w(M.T)
    for lin, side in ((o, "out"), (gate, "in"), (up, "in")):
        rotate(lin, M, side)
    narrow_norm(layer.post_attention_layernorm, width, dense)
    outs = run_layer(layer, xs, kws)  # (B, T, d) in the original basis
    val_out, Q = pca_basis(signal_covariance(outs, masks))
    N = Q[:, :width]
    layer.mlp_shortcut = as_w(M.T @ N)
    rotate(down, N, "out")
    return [(y.double() @ N).to(y.dtype) for y in outs], N, torch.stack([val_mid, val_out])



@torch.no_grad()
def slice_model(model: nn.Module, batches: list[dict], width: int) -> torch.Tensor:
    """SliceGPT (sequential, as released) in place: fold the norms, rotate the embeddings into the PCA basis of layer
    0's input, slice every layer (slice_block) and the LM head to `width`, and make the model a SliceGPT model
    (slicegpt.add_shortcuts). -> the eigenvalues of every PCA, (2L + 1, d): embeddings, then 2 per layer."""
    check_sliceable(model)
    cfg, d = model.config, model.config.hidden_size
    if not 1 <= width <= d or width % cfg.num_attention_heads:
        raise ValueError(f"a SliceGPT width must be a multiple of the {cfg.num_attention_heads} attention heads (a "
                         f"Hugging Face config requires it) in [1, {d}], not {width}")
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    fold_norms(model)
    xs, kws, masks = block_inputs(model, batches)
    val, Q = pca_basis(signal_covariance(xs, masks))
    P = Q[:, :width]
    rotate(model.get_input_embeddings(), P, "in")
    xs, spectra = [(x.double() @ P).to(x.dtype) for x in xs], [val[None]]
    for layer, kw in zip(tqdm(decoder_layers(model), desc="slicegpt", disable=not is_main(), leave=False), kws):
        xs, P, vals = slice_block(layer, xs, kw, masks, P, d)
        spectra.append(vals)
    rotate(model.get_output_embeddings(), P, "in")
    narrow_norm(model.base_model.norm, width, d)
    cfg.head_dim, cfg.hidden_size = head_dim, width  # heads keep their width; only the residual stream narrows
    cfg.slicegpt = {"hidden_size_dense": d, "base_model_type": cfg.model_type}
    add_shortcuts(model, [(layer.attn_shortcut.data, layer.mlp_shortcut.data) for layer in decoder_layers(model)])
    return torch.cat(spectra).float().cpu()



def slice_round(model: nn.Module, batches: list[dict], width: int) -> tuple[dict, dict]:
    """--baseline slicegpt's one round: slice_model to `width`. -> (the round's record, its PCA spectra as the
    round's scores: the energy each slice keeps, and the eigenvalues for scores.safetensors)"""
    spectra = slice_model(model, batches, width)
    rec = {"removed_neurons": {}, "removed_layers": [], "neurons_per_layer": 0, "hidden_size": width,
           "scores": {"energy_kept": (spectra[:, :width].sum(1) / spectra.sum(1)).tolist()}}
    return rec, {"pca_eigenvalues": spectra}


def slice_width(model: nn.Module, ratio: float) -> int:
    """SliceGPT's d' for --target-ratio: the largest multiple of `step` whose model has <= (1 - ratio) of the dense
    model's parameters; step = lcm(8, heads) (SliceGPT rounds to 8; a config needs a multiple of the heads), or
    just the number of heads where that leaves fewer than 16 steps (SmolLM2: 576 = 64 x 9 heads). Sliced, the
    model has P(d') = 2 L d'^2 (the shortcuts) + b d' + c parameters: b per unit of width (embedding and LM head
    columns, untied; the columns of q/k/v/gate/up, the rows of o/down; the norms), c the rest."""
    layers, d = decoder_layers(model), model.config.hidden_size
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    b = emb.weight.shape[0] + head.weight.shape[0] + 1
    for layer in layers:
        (q, k, v, o), (gate, up, down) = attention(layer), ffn(layer)
        b += sum(m.out_features for m in (q, k, v, gate, up)) + sum(m.in_features + (m.bias is not None)
                                                                  for m in (o, down)) + 2
    P0 = count_params(model)["total"]
    c = P0 + head.weight.numel() * (head.weight.data_ptr() == emb.weight.data_ptr()) - b * d
    heads = model.config.num_attention_heads
    step = math.lcm(8, heads) if d >= 16 * math.lcm(8, heads) else heads
    for w in range(d - d % step, 0, -step):
        if 2 * len(layers) * w * w + b * w + c <= (1 - ratio) * P0:
            return w
    raise ValueError(f"--baseline slicegpt --target-ratio {ratio} is out of reach: no hidden width meets it")



# ----------------------------------------------------------------------------- checkpoints
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



def sliced_model_class(config) -> type:
    """The SliceGPT class of a sliced config: the stock CausalLM class of its base model type, with shortcuts."""
    from transformers import AutoModelForCausalLM

    return sliced_class(AutoModelForCausalLM._model_mapping[type(config)])
