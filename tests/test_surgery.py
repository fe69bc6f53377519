"""Surgery is the spec: a physically pruned model computes what the dense model computes with those
neurons (or layers) switched off, on Llama, Qwen2 and Gemma2, tied or untied, with GQA and padding."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

import baselines
import ptl
import ptl_common
from conftest import ARCHS, logits, padded_batch, tiny_model

ATOL = 1e-5
model_args = st.fixed_dictionaries({
    "arch": st.sampled_from(ARCHS), "tied": st.booleans(), "kv_heads": st.sampled_from([1, 2, 4]),
    "seed": st.integers(0, 2**16),
})
lengths = st.lists(st.integers(1, 12), min_size=1, max_size=4)
# Removing columns changes how BLAS groups the down_proj sum, so fp32 results move by rounding. When nearly
# every neuron of a layer is gone, Gemma2's post-FFN RMSNorm rescales the few survivors' (cancelling) sum and
# that rounding reaches ~1e-5 (seen: 1.6e-5 with 21 of 24 removed). So fp32 is held to atol 1e-5 for up to
# half the width (worst seen in 300 random cases: 1.8e-6), and fp64 to 1e-12 for any number removed. fp64
# batches are unpadded: transformers' fp64 eager attention gives NaN to a padded query whose sliding window
# holds only padding (fp32 and bf16 do not), and NaN then reaches real tokens through 0 * NaN.
precision = st.sampled_from([(torch.float32, 12, ATOL), (torch.float64, 23, 1e-12)])


def batch_for(seed: int, lens: list[int], dtype) -> dict:
    return padded_batch(seed, lens if dtype == torch.float32 else [max(lens)] * len(lens))


def real(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """Only the positions of real tokens: padded positions carry no meaning."""
    return x[batch["attention_mask"].bool()]


def random_subsets(g: torch.Generator, L: int, I: int, k: int) -> list[torch.Tensor]:
    return [torch.randperm(I, generator=g)[:k].sort().values for _ in range(L)]


def complement(removed: list[torch.Tensor], I: int) -> list[torch.Tensor]:
    return [torch.tensor(sorted(set(range(I)) - set(r.tolist()))) for r in removed]


def model_and_subsets(m: dict, k: int, prec: tuple):
    """A tiny model in the drawn precision and, per layer, k random neurons (k capped for fp32)."""
    dtype, k_max, _ = prec
    model, k = tiny_model(**m).to(dtype), min(k, k_max)
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    return model, random_subsets(torch.Generator().manual_seed(m["seed"]), L, I, k)


@settings(max_examples=30, deadline=None)
@given(m=model_args, k=st.integers(1, 23), lens=lengths, prec=precision)
def test_zero_activation_neurons_score_zero_and_removing_them_keeps_logits(m, k, lens, prec):
    model, zero = model_and_subsets(m, k, prec)
    (dtype, _, atol), k, I = prec, len(zero[0]), model.config.intermediate_size
    with torch.no_grad():  # up_proj row j = 0  =>  Act_j = act_fn(gate_j x) * 0 = 0 for every token
        for layer, z in zip(ptl_common.decoder_layers(model), zero):
            ptl_common.ffn(layer)[1].weight[z] = 0
    batch = batch_for(m["seed"], lens, dtype)
    dense = logits(model, batch)
    scores = ptl.neuron_scores(model, [batch])
    for s, z in zip(scores, zero):
        assert (s[z] == 0).all(), "a neuron that never activates must score exactly 0"
        assert set(ptl.lowest(s, k).tolist()) == set(z.tolist())
    ptl.prune_neurons(model, complement(zero, I))
    assert model.config.intermediate_size == I - k
    torch.testing.assert_close(real(logits(model, batch), batch), real(dense, batch), atol=atol, rtol=0)


@settings(max_examples=30, deadline=None)
@given(m=model_args, k=st.integers(1, 23), lens=lengths, prec=precision)
def test_pruned_model_equals_dense_model_with_those_neurons_zeroed(m, k, lens, prec):
    model, removed = model_and_subsets(m, k, prec)
    (dtype, _, atol), I = prec, model.config.intermediate_size
    reference = copy.deepcopy(model)
    with torch.no_grad():  # down_proj column j = 0 switches neuron j off without changing shapes
        for layer, r in zip(ptl_common.decoder_layers(reference), removed):
            ptl_common.ffn(layer)[2].weight[:, r] = 0
    ptl.prune_neurons(model, complement(removed, I))
    batch = batch_for(m["seed"], lens, dtype)
    got, want = (real(logits(m_, batch), batch) for m_ in (model, reference))
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def make_identity(model, l: int) -> None:
    """Zero o_proj and down_proj: layer l adds nothing to the residual stream, so f_l(h) = h exactly."""
    layer = ptl_common.decoder_layers(model)[l]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        ptl_common.ffn(layer)[2].weight.zero_()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("l", [0, 1, 3])
def test_identity_layer_scores_zero_and_dropping_it_keeps_logits(arch, l):
    model = tiny_model(arch, layers=5)
    make_identity(model, l)
    batch = padded_batch(l, (12, 9, 5))  # longer than the 4-token sliding window of Qwen2/Gemma2 layers
    dense = logits(model, batch)
    distance = ptl.layer_scores(model, [batch])
    assert distance[l] == 0 and (distance[torch.arange(5) != l] > 0).all()
    assert ptl.layer_scores(model, [batch], rule="bi")[l].abs() < 1e-6
    assert ptl.lowest(distance, 1).tolist() == [l]
    ptl.drop_layers(model, [l])
    torch.testing.assert_close(real(logits(model, batch), batch), real(dense, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rule", ["eq4", "released"])
def test_padding_never_changes_a_score(arch, rule):
    model = tiny_model(arch)
    batch = padded_batch(3, (12, 5, 8))
    alone = [{k: v[b : b + 1, :n] for k, v in batch.items()} for b, n in enumerate((12, 5, 8))]
    n_padded = ptl.neuron_scores(model, [batch], rule=rule)
    n_alone = ptl.neuron_scores(model, alone, rule=rule)
    for a, b in zip(n_padded, n_alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ptl.layer_scores(model, [batch]), ptl.layer_scores(model, alone), atol=1e-5, rtol=1e-5)


def test_down_proj_input_is_the_eq3_activation():
    """The hook reads Act where HF computes it; check it is act_fn(W_gate x) * (W_up x)."""
    model = tiny_model("gemma2")  # GELU-tanh, not SiLU: the identity is not Llama-specific
    mlp = ptl_common.decoder_layers(model)[1].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    seen = []
    h = mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        mlp(x)
    h.remove()
    torch.testing.assert_close(seen[0], mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_gives_identical_logits_and_kv_cache_agrees_after_surgery(arch, tmp_path):
    model = tiny_model(arch, layers=5, tied=arch != "llama")
    g = torch.Generator().manual_seed(0)
    ptl.prune_neurons(model, complement(random_subsets(g, 5, 24, 9), 24))
    ptl.drop_layers(model, [0, 3])  # Gemma2: removes a sliding and a full layer; Qwen2: the full one
    batch = padded_batch(1, (12, 12))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(again, batch), logits(model, batch))
    assert getattr(again.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    prompt = batch["input_ids"][:1]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(again.generate(prompt, use_cache=True, **kw), again.generate(prompt, use_cache=False, **kw))


def test_config_and_bookkeeping_follow_the_surgery():
    model = tiny_model("gemma2", layers=5).to(torch.bfloat16)
    types = list(model.config.layer_types)
    ptl.prune_neurons(model, [torch.arange(10)] * 5)
    ptl.drop_layers(model, [1, 2])
    cfg, layers = model.config, ptl_common.decoder_layers(model)
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (10, 3)
    assert cfg.layer_types == [types[0], types[3], types[4]]
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert all(tuple(lin.weight.shape) in {(10, 32), (32, 10)} for layer in layers for lin in ptl_common.ffn(layer))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings stay tied"


def test_qwen_max_window_layers_counts_the_kept_full_attention_layers():
    model = tiny_model("qwen2", layers=4)  # max_window_layers=1: layer 0 full, 1-3 sliding
    ptl.drop_layers(model, [2])
    assert model.config.max_window_layers == 1
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]


@pytest.mark.parametrize("model, name", [
    (GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)), "gpt2"),
    (Phi3ForCausalLM(Phi3Config(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                vocab_size=64, pad_token_id=0)), "phi3"),
])
def test_unsupported_architectures_raise_an_error_naming_the_model_type(model, name):
    with pytest.raises(ValueError, match=f"unsupported architecture '{name}'"):
        ptl_common.check_supported(model)


@pytest.mark.parametrize("bad_keep", [
    [torch.arange(0)] * 3,                            # every neuron
    [torch.arange(5), torch.arange(5), torch.arange(6)],  # non-uniform widths
    [torch.tensor([0, 0, 1])] * 3,                    # duplicates
    [torch.tensor([0, 24])] * 3,                      # out of range
    [torch.arange(5)] * 2,                            # wrong number of layers
])
def test_bad_keep_is_refused_before_the_model_is_touched(bad_keep):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        ptl.prune_neurons(model, bad_keep)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.config.intermediate_size == 24


@pytest.mark.parametrize("drop", [[0, 1, 2], [3], [-1]])
def test_dropping_every_layer_or_a_missing_one_is_refused(drop):
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        ptl.drop_layers(model, drop)
    assert len(ptl_common.decoder_layers(model)) == model.config.num_hidden_layers == 3


def test_nan_activations_stop_scoring_with_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        ptl_common.ffn(ptl_common.decoder_layers(model)[1])[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        ptl.neuron_scores(model, [padded_batch()])


# ----------------------------------------------------------------------------- LLM-Pruner's Taylor neuron score


@pytest.mark.parametrize("variant", ["element", "vector"])
def test_a_neuron_whose_weights_are_all_zero_has_taylor_score_zero(variant):
    model = tiny_model("llama", tied=False)
    gate, up, down = ptl_common.ffn(ptl_common.decoder_layers(model)[1])
    with torch.no_grad():
        gate.weight[5], up.weight[5], down.weight[:, 5] = 0, 0, 0
    s = baselines.taylor_neuron_scores(model, [padded_batch(0), padded_batch(1)], variant=variant)
    assert s.shape == (3, 24) and s[1, 5] == 0 and (s[1] != 0).sum() == 23


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_vector_wise_taylor_score_is_the_loss_slope_of_scaling_each_matrix_of_the_group(arch):
    """For neuron i, |d Loss / d eps| of W_gate[i] -> (1 + eps) W_gate[i] is |sum_j W_ij G_ij|; the same for W_up[i]
    and W_down[:, i]; their sum is the vector-wise score (x tokens). Central differences."""
    model = tiny_model(arch, tied=False).double()
    batches = [padded_batch(0, lengths=(9, 9)), padded_batch(2, lengths=(6,))]  # float64 Qwen2 NaNs on padding
    tokens = sum(int(baselines.calib_loss(model, b)[1]) for b in batches)  # the labelled tokens the score is divided by
    score = baselines.taylor_neuron_scores(model, batches, variant="vector").double() * tokens
    gate, up, down = ptl_common.ffn(ptl_common.decoder_layers(model)[0])

    def loss() -> float:  # calib_loss's sum, kept in float64
        total = 0.0
        with torch.no_grad():
            for b in batches:
                out = model(**b).logits[:, :-1]
                labels = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
                total += float(torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="sum"))
        return total

    for i in (0, 7):
        slopes = []
        for view in (gate.weight[i], up.weight[i], down.weight[:, i]):
            w0, eps = view.clone(), 1e-2  # RMSNorm computes in float32 even here: a small eps drowns in rounding
            with torch.no_grad():
                view.copy_(w0 * (1 + eps))
                hi = loss()
                view.copy_(w0 * (1 - eps))
                lo = loss()
                view.copy_(w0)
            slopes.append(abs(hi - lo) / (2 * eps))
        assert float(score[0, i]) == pytest.approx(sum(slopes), rel=5e-3)


def test_the_element_wise_taylor_score_bounds_the_vector_wise_one():
    model = tiny_model("qwen2")
    batches = [padded_batch(3)]
    element = baselines.taylor_neuron_scores(model, batches, variant="element")
    vector = baselines.taylor_neuron_scores(model, batches, variant="vector")
    assert (element >= vector - 1e-7).all() and (element > vector).any()
