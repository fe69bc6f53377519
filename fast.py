"""Optimisations that each have a plain equivalent, and a test that they agree with it. A reader of the paper can
skip this file: batched decoding that drops finished rows and joins new ones, a KV cache that grows in place,
attention that reads a prompt prefix shared by a whole batch once, the LM head's cross-entropy in chunks, selective
activation checkpointing.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from contextlib import contextmanager
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

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
    """Greedy (or, with one generator per row in `gens`, sampled) decoding of a left-padded batch x (B, T), mask
    (B, T), whose first cache.get_seq_length() positions `cache` (or None) holds. -> each row's generated ids, its
    last token included, in the order the rows entered.

    A row leaves the batch and its KV cache when it ends (a token in `eos`, a stop string in its decoded tail, or
    max_new_tokens), where HF generate computes finished rows until the longest ends. `refill(free)` -> (x, mask,
    cache, gens) of up to `free` more rows, or None: they join once a quarter of the slots are free (all of them
    under a sliding-window cache). `prefix`: a one-row KV cache of tokens before every row, which each row reads
    through prefix_attention instead of a copy of its own (needs shares_prefix(model))."""
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


def common_prefix(ids: list[list[int]]) -> int:
    """Length of the longest token prefix that every sequence shares, leaving each at least one token of its own."""
    if len(ids) < 2:
        return 0
    c, shortest = 0, min(map(len, ids))
    while c < shortest - 1 and all(x[c] == ids[0][c] for x in ids):
        c += 1
    return c



def prefix_cache(model, ids: list[int]):
    """The KV cache of a shared prefix `ids` for one row (None for an empty prefix)."""
    if not ids:
        return None
    return returned_cache(model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=True))


# ----------------------------------------------------------------------------- training (recover.py, grpo.py)


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


# ----------------------------------------------------------------------------- scoring (ptl.py)


def real_spans(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row of mask (B, T), the (start, end) of its real tokens when they are contiguous (left or right
    padding, as tokenizers pad), else None."""
    n, start = mask.sum(1), mask.int().argmax(1)
    spans = list(zip(start.tolist(), (start + n).tolist()))
    if any(e == s for s, e in spans) or not all(bool(mask[b, s:e].all()) for b, (s, e) in enumerate(spans)):
        return None
    return spans
