"""fast.decode is the spec for every generation: greedy equals transformers' generate, sampling filters
tokens exactly as transformers' warpers do and draws from what is left, and a rollout does not depend on its batch."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import grpo
from conftest import char_tokenizer, tiny_config, tiny_model
from fast import (GROWING, Sampling, attention_implementation, cache_arg, decode, next_tokens, prefix_attention_name,
                  repeat_cache, returned_cache, shares_prefix)
from models import DEFAULT_MODEL

PROMPTS = ["Question: 12 + 30 = ? Answer:", "Question: 7 * 6? Answer:", "Q: 5 legs?"]


def allowed(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The tokens transformers' own warpers leave finite (temperature, then top-k, then top-p)."""
    z = logits / s.temperature
    if s.top_k:
        z = TopKLogitsWarper(s.top_k)(None, z)
    if s.top_p < 1:
        z = TopPLogitsWarper(s.top_p)(None, z)
    return torch.isfinite(z)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.3, 2.0), st.floats(0.05, 1.0), st.integers(0, 12))
def test_a_sampled_token_is_always_one_that_transformers_warpers_keep(seed, temperature, top_p, top_k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 40, generator=g) * 3
    s = Sampling(temperature, top_p, top_k)
    gens = [torch.Generator().manual_seed(seed + j) for j in range(3)]
    for _ in range(5):
        tok = next_tokens(logits, s, gens)
        assert allowed(logits, s)[torch.arange(3), tok].all()


def test_top_p_golden_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # 0.5 + 0.3 >= 0.8: tokens 0 and 1 stay
    seen = {int(next_tokens(logits, Sampling(top_p=0.8), [torch.Generator().manual_seed(i)])) for i in range(200)}
    assert seen == {0, 1}
    assert allowed(logits, Sampling(top_p=0.8)).tolist() == [[True, True, False, False]]


def test_draws_follow_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    p = (logits / 0.7).softmax(-1)[0]
    gen, n = [torch.Generator().manual_seed(0)], 20000
    counts = torch.bincount(torch.cat([next_tokens(logits, Sampling(temperature=0.7), gen) for _ in range(n)]),
                            minlength=4).double()
    # 5 standard errors of a binomial proportion: a wrong temperature or filter is off by far more
    assert ((counts / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (counts / n, p)


OPS = st.lists(st.one_of(*(st.tuples(st.just(op), st.integers(lo, hi)) for op, lo, hi in
                           [("update", 1, 5), ("select", 0, 7), ("repeat", 1, 2), ("crop", 1, 3)])),
               min_size=1, max_size=25)


@settings(max_examples=100, deadline=None)
@given(OPS, st.integers(0, 2**31))
def test_the_growing_cache_layer_holds_what_transformers_dynamic_layer_holds(ops, seed):
    from transformers.cache_utils import DynamicLayer

    g = torch.Generator().manual_seed(seed)
    plain, grown = DynamicLayer(), DynamicLayer()
    grown.__class__ = GROWING()
    B = 2
    for op, n in ops:
        T = plain.get_seq_length()
        if op == "update":
            k, v = torch.randn(2, B, 3, n, 4, generator=g)
            for layer in (plain, grown):
                out = layer.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(out, (plain.keys, plain.values)))
        elif op == "select" and T:
            idx = torch.tensor([i for i in range(B) if n >> i & 1] or [0])
            B = len(idx)
            for layer in (plain, grown):
                layer.batch_select_indices(idx)
        elif op == "repeat" and T:
            B *= n
            for layer in (plain, grown):
                layer.batch_repeat_interleave(n)
        elif op == "crop" and T > n:
            for layer in (plain, grown):
                layer.crop(-n)
        assert grown.get_seq_length() == plain.get_seq_length()
        if plain.get_seq_length():
            assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


def _cfg(**kw) -> grpo.Config:
    return grpo.Config(**{"group_size": 4, "max_response_length": 10, "prompt": "fewshot", "max_prompt_length": 64,
                          "temperature": 1.0, "top_p": 1.0, **kw})


def test_greedy_rollouts_equal_transformers_generate_token_for_token():
    model, tok = tiny_model("qwen2", layers=2), char_tokenizer()  # qwen2: sliding-window layers
    P, R = grpo.rollout(model, tok, PROMPTS, _cfg(top_k=1), [1, 2, 3])  # top-k 1: sampling is the argmax
    for i, p in enumerate(PROMPTS):
        x = tok(p, return_tensors="pt")
        ref = model.generate(**x, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                             temperature=None, top_p=None, top_k=None)[0, x["input_ids"].shape[1]:].tolist()
        ref = ref[: ref.index(2) + 1] if 2 in ref else ref
        for g in range(4):
            assert P[4 * i + g] == x["input_ids"][0].tolist()
            assert R[4 * i + g] == ref


def test_a_rollout_does_not_depend_on_the_batch_it_was_sampled_in():
    model, tok = tiny_model("llama", layers=2), char_tokenizer()
    together = grpo.rollout(model, tok, PROMPTS, _cfg(), [11, 12, 13])
    alone = [grpo.rollout(model, tok, [p], _cfg(), [s]) for p, s in zip(PROMPTS, [11, 12, 13])]
    assert together[1] == [r for _, R in alone for r in R]
    assert len({tuple(r) for r in together[1][:4]}) > 1, "the G responses of a prompt must differ"
    again = grpo.rollout(model, tok, PROMPTS, _cfg(), [11, 12, 13])
    assert again == together


def test_both_rollout_engines_sample_the_same_distribution():
    """Per-token frequencies of the first response token, builtin vs generate, over many draws from one prompt."""
    model, tok = tiny_model("llama", layers=1), char_tokenizer()
    firsts = {}
    for engine in ("builtin", "hf"):
        cfg = _cfg(rollout_engine=engine, group_size=400, max_response_length=1, temperature=0.8, top_p=0.9)
        firsts[engine] = torch.tensor([r[0] for r in grpo.rollout(model, tok, PROMPTS[:1], cfg, [5])[1]])
    a, b = (torch.bincount(f, minlength=128).double() / len(f) for f in firsts.values())
    se = ((a + b) / 2 * (1 - (a + b) / 2) * 2 / 400).sqrt()
    assert ((a - b).abs() <= 5 * se + 1e-9).all()
    assert math.isclose(a.sum().item(), 1.0)


@pytest.mark.slow
def test_greedy_rollouts_equal_generate_on_the_default_model():
    from models import load_model

    model, tok = load_model(DEFAULT_MODEL, dtype="float32")
    prompts = [grpo.render(tok, q, "fewshot") for q in ("What is 17 + 25?", "A dog and a hen: how many legs?")]
    P, R = grpo.rollout(model, tok, prompts, _cfg(top_k=1, group_size=2, max_response_length=48,
                                                  max_prompt_length=2048), [1, 2])
    for i, p in enumerate(prompts):
        x = tok(p, return_tensors="pt")
        ref = model.generate(**x, do_sample=False, max_new_tokens=48, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
        ref = ref[0, x["input_ids"].shape[1]:].tolist()
        ref = ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
        assert R[2 * i] == R[2 * i + 1] == ref


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])  # qwen2, gemma2: sliding windows, no joining
def test_refilled_slots_decode_each_row_as_it_would_decode_alone(arch):
    """Continuous batching: 7 prompts through 3 slots, rows ending at random times (almost half the vocabulary is
    EOS; the 25-token prompt enters after shorter ones, so both sides of a join get padded). Each row's tokens
    equal its own batch-of-one decode; with full-attention caches no decode step runs with a slot free while
    prompts wait."""
    model = tiny_model(arch, layers=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 128, (n,), generator=g) for n in (4, 3, 6, 9, 25, 7, 5)]
    kw = dict(max_new_tokens=9, eos=set(range(3, 60)))
    alone = [decode(model, p[None], torch.ones(1, len(p), dtype=torch.long), None, **kw)[0] for p in prompts]
    pending, entered, seen = list(range(len(prompts))), [], []

    def refill(free: int):
        if not pending:
            return None
        batch = [pending.pop(0) for _ in range(min(free, len(pending)))]
        x = torch.zeros(len(batch), max(len(prompts[i]) for i in batch), dtype=torch.long)
        for b, i in enumerate(batch):  # left padding
            x[b, x.shape[1] - len(prompts[i]):] = prompts[i]
        entered.extend(batch)
        return x, (x != 0).long(), None, None

    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append((k["input_ids"].shape, bool(pending))),
                                           with_kwargs=True)
    together = decode(model, *refill(3)[:3], refill=refill, **kw)
    hook.remove()
    assert entered == list(range(len(prompts)))
    assert together == alone
    assert max(len(r) for r in alone) > 2 * min(len(r) for r in alone), "rows must end at different times"
    if arch == "llama":
        assert all(shape[0] == 3 for shape, waiting in seen if waiting and shape[1] == 1)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 12), st.lists(st.integers(1, 9), min_size=1, max_size=4),
       st.integers(0, 2**31))
def test_attention_through_a_shared_prefix_equals_attention_over_a_copy_of_it_per_row(kv_heads, c, lengths, seed):
    """prefix_attention (prefix read once for the batch) against transformers' own attention over the prefix
    repeated into every row's cache: a left-padded prefill of the rows, then one decoded token, any number of
    query heads per KV head."""
    model, g = tiny_model("llama", layers=2, kv_heads=kv_heads), torch.Generator().manual_seed(seed)
    B, S, arg = len(lengths), max(lengths), cache_arg(model)
    x, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, S - n :], mask[b, S - n :] = torch.randint(4, 128, (n,), generator=g), 1
    pos = (mask.cumsum(1) - 1).clamp(min=0) + c
    with torch.no_grad():
        shared = returned_cache(model(input_ids=torch.randint(4, 128, (1, c), generator=g), use_cache=True))
        ref = model(input_ids=x, attention_mask=torch.cat([torch.ones(B, c, dtype=torch.long), mask], 1),
                    position_ids=pos, use_cache=True, **{arg: repeat_cache(shared, B)})
        with attention_implementation(model, prefix_attention_name()):
            got = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, shared_prefix=shared)
            nxt, one = ref.logits[:, -1:].argmax(-1), torch.ones(B, 1, dtype=torch.long)
            got2 = model(input_ids=nxt, attention_mask=torch.cat([mask, one], 1), position_ids=pos[:, -1:] + 1,
                         use_cache=True, shared_prefix=shared, **{arg: returned_cache(got)})
        ref2 = model(input_ids=nxt, attention_mask=torch.cat([torch.ones(B, c, dtype=torch.long), mask, one], 1),
                     position_ids=pos[:, -1:] + 1, use_cache=True, **{arg: returned_cache(ref)})
    assert model.config._attn_implementation == "eager", "the implementation must be put back"
    torch.testing.assert_close(got.logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2.logits, ref2.logits, atol=1e-5, rtol=1e-5)


def test_only_plain_full_attention_reads_a_shared_prefix():
    full = tiny_config("qwen2")
    full.use_sliding_window, full.layer_types = False, ["full_attention"] * full.num_hidden_layers
    assert shares_prefix(tiny_model("llama")) and shares_prefix(AutoModelForCausalLM.from_config(full))
    assert not shares_prefix(tiny_model("qwen2"))  # sliding-window layers
    assert not shares_prefix(tiny_model("gemma2"))  # sliding windows and logit soft-capping
