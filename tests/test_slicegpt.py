"""SliceGPT (ptl.py --baseline slicegpt) is the spec: folding and rotating change nothing, slicing keeps the most
energy, the sliced model saves, loads, decodes, counts its FLOPs and trains like any other checkpoint."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import models
import ptl
import ptl_common
import recover
import report
import slicegpt
from conftest import char_tokenizer, logits, padded_batch, tiny_model
from data import load_texts
from ptl_common import import_evaluate

ev = import_evaluate()


def calib(n: int = 3, lengths=(11, 7, 3)) -> list[dict]:
    return [padded_batch(seed, lengths) for seed in range(n)]


def real_logits(model, batch) -> torch.Tensor:
    return logits(model, batch)[batch["attention_mask"].bool()]


def assert_float_close(a: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 rounding, which grows with the logits' scale (the norms run in fp32 either way)."""
    torch.testing.assert_close(a, ref, atol=4e-5 * max(1.0, ref.abs().max().item()), rtol=0)


def sliced(arch: str = "llama", width: int = 16, **kw):
    model = tiny_model(arch, **kw)
    slicegpt.slice_model(model, calib(), width)
    return model


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]), tied=st.booleans(), kv_heads=st.sampled_from([1, 2, 4]),
       lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 3))
def test_rotation_without_slicing_leaves_logits_unchanged(arch, tied, kv_heads, lengths, seed):
    model = tiny_model(arch, seed=seed, tied=tied, kv_heads=kv_heads)
    batch = padded_batch(seed + 10, lengths)
    ref = real_logits(model, batch)
    slicegpt.slice_model(model, calib() + [padded_batch(seed, lengths)], model.config.hidden_size)
    assert type(model).__name__.startswith("SliceGPT") and not model.config.tie_word_embeddings
    assert_float_close(real_logits(model, batch), ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folding_the_norms_alone_leaves_logits_and_the_embeddings_unchanged(arch):
    model = tiny_model(arch, tied=True)
    for norm in [model.base_model.norm] + [m for layer in model.base_model.layers
                                           for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
        torch.nn.init.uniform_(norm.weight, 0.5, 2.0)  # scales that matter
    emb, batch = model.get_input_embeddings().weight.clone(), padded_batch(0)
    ref = real_logits(model, batch)
    slicegpt.fold_norms(model)
    assert_float_close(real_logits(model, batch), ref)
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the final norm went into the untied head only
    assert torch.equal(model.base_model.norm.weight, torch.ones_like(model.base_model.norm.weight))


def test_a_narrowed_norm_computes_rmsn_over_the_dense_width():
    norm = tiny_model("llama").base_model.norm  # RMSNorm(32), eps 1e-6
    x = torch.tensor([[3.0, -4.0, 0.0, 12.0]])  # |x|^2 = 169; dense width d = 16
    slicegpt.narrow_norm(norm, 4, 16)
    expected = x / math.sqrt(169 / 16 + 1e-6)  # SliceGPT's RMSN: the mean is over d, not over the 4 kept
    torch.testing.assert_close(norm(x), expected)


@settings(max_examples=10, deadline=None)
@given(d=st.integers(2, 12), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_the_pca_basis_is_orthonormal_and_keeps_more_energy_than_any_other_basis_at_every_width(d, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, d, dtype=torch.float64)
    _, Q = slicegpt.pca_basis(x.T @ x)
    torch.testing.assert_close(Q.T @ Q, torch.eye(d, dtype=torch.float64))
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q  # another orthonormal basis
    err = [((x - x @ Q[:, :w] @ Q[:, :w].T) ** 2).sum().item() for w in range(d + 1)]
    other = [((x - x @ R[:, :w] @ R[:, :w].T) ** 2).sum().item() for w in range(d + 1)]
    assert all(a >= b - 1e-9 for a, b in zip(err, err[1:])) and err[-1] < 1e-18 * max(1, err[0]) + 1e-12
    assert all(e <= o + 1e-9 for e, o in zip(err, other))


def test_the_reconstruction_error_of_each_block_input_falls_as_the_kept_width_grows():
    model = tiny_model("llama", layers=2)
    xs, kws, masks = slicegpt.block_inputs(model, calib())
    x = torch.cat([h[m] for h, m in zip(xs, masks)]).double()  # layer 0's input, every real token (N, d)
    vals, Q = slicegpt.pca_basis(slicegpt.signal_covariance(xs, masks), damp=0)
    err = [((x - x @ Q[:, :w] @ Q[:, :w].T) ** 2).sum().item() for w in range(0, 33, 4)]
    assert all(a > b for a, b in zip(err, err[1:])) and err[-1] < 1e-8 * err[0]
    assert err[2] == pytest.approx(vals[8:].sum().item(), rel=1e-6)  # the energy of the directions sliced off


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_then_load_gives_identical_logits_and_a_stock_loader_refuses_naming_the_type(arch, tmp_path):
    model = sliced(arch, 16, tied=arch == "llama")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == slicegpt.SLICED
    again, _ = models.load_model(str(tmp_path), attn="eager")
    batch = padded_batch(3)
    assert torch.equal(real_logits(again, batch), real_logits(model, batch))
    assert again.config.hidden_size == 16 and len(load_file(tmp_path / "model.safetensors")) == len(model.state_dict())
    with pytest.raises(ValueError, match=slicegpt.SLICED):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_generation_with_the_kv_cache_equals_generation_without_it():
    model, tok = sliced("qwen2", 16), char_tokenizer()  # qwen2: sliding-window layers and q/k/v biases
    prompts = ["Q: 2+2?\nA:", "Q: 10+20?\nA:", "Q: 7?\nA:"]
    cached, _ = ev.generate(model, tok, prompts, max_new_tokens=10, stop=[], batch_size=3, add_bos=True)
    x = tok(prompts[0], return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a, b = model.generate(**x, use_cache=True, **kw), model.generate(**x, use_cache=False, **kw)
    assert torch.equal(a, b)
    assert cached[0] == tok.decode(a[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


def test_forward_flops_count_the_shortcuts_and_equal_torch_flop_counter():
    model = sliced("llama", 16)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 17)))
    assert report.forward_flops(model.config, 17, batch=2) == fc.get_total_flops()


def test_recover_trains_a_sliced_model_and_saves_it_loadable(tmp_path):
    model, tok = sliced("llama", 16, layers=2), char_tokenizer()
    texts = load_texts("offline", n=8, seed=0)
    cfg = recover.Config(out=str(tmp_path), max_length=32, global_batch=4, micro_batch=4, lr=1e-2, max_steps=12,
                         warmup_ratio=0, epochs=100)
    recover.train(model, tok, texts, cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3
    again, _ = models.load_model(str(tmp_path))
    assert again.config.hidden_size == 16 and type(again).__name__.startswith("SliceGPT")


def test_the_width_meets_the_target_and_the_parameter_formula_is_exact():
    model = tiny_model("llama", layers=3, tied=True)
    P0 = ptl_common.count_params(model)["total"]
    w = slicegpt.slice_width(model, 0.3)
    slicegpt.slice_model(model, calib(), w)
    P = ptl_common.count_params(model)["total"]
    assert P <= 0.7 * P0 and w % model.config.num_attention_heads == 0
    wider = tiny_model("llama", layers=3, tied=True)
    slicegpt.slice_model(wider, calib(), w + model.config.num_attention_heads)
    assert ptl_common.count_params(wider)["total"] > 0.7 * P0  # the next width up would miss the target


def test_unsupported_models_and_layer_removal_after_slicing_are_refused():
    with pytest.raises(ValueError, match="gemma2.*post_feedforward_layernorm"):
        slicegpt.slice_model(tiny_model("gemma2"), calib(), 16)
    model = sliced("llama", 16)
    with pytest.raises(ValueError, match="already sliced"):
        slicegpt.slice_model(model, calib(), 8)
    with pytest.raises(ValueError, match="basis"):
        ptl.drop_layers(model, [0])
    with pytest.raises(ValueError, match="multiple of the 4 attention heads"):
        slicegpt.slice_model(tiny_model("llama"), calib(), 10)


def test_the_slicegpt_baseline_runs_end_to_end_recovers_reports_and_resumes(tiny_dirs, tmp_path):
    flags = dict(model=tiny_dirs["llama"], out=str(tmp_path), baseline="slicegpt", target_ratio=0.2, calib_samples=8,
                 max_length=48, recovery="cpt", cpt_flags="--samples 8 --max-length 32 --global-batch 4 "
                                                         "--micro-batch 4 --max-steps 2")
    r = ptl.main(ptl.Config(**flags))
    rec = ptl_common.load_record(tmp_path / "round_1")
    assert r["rounds"] == 1 and rec["kind"] == "slicegpt" and rec["hidden_size"] < rec["dense"]["hidden_size"]
    assert r["removed_ratio"] >= 0.2 and len(rec["scores"]["energy_kept"]) == 2 * 4 + 1
    assert load_file(tmp_path / "round_1" / "scores.safetensors")["pca_eigenvalues"].shape == (9, 32)
    assert ptl.main(ptl.Config(**flags))["records"] == []  # resumed: nothing left to do
    assert report.write_report(tmp_path)["rows"][1]["flop_ratio_128"] > 1
    with pytest.raises(ValueError, match="--layer-target would be ignored"):
        ptl.Config(**{**flags, "layer_target": 1})
