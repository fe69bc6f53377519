"""Hand-computed goldens for each equation and for the plan of rounds."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import baselines
import fast
import ptl
from conftest import tiny_model
from ptl_common import count_params


def test_neuron_score_is_max_abs_activation_over_real_tokens():
    act = torch.tensor([[[1.0, -3.0, 0.0], [2.0, 0.5, 0.0]],
                        [[-4.0, 1.0, 9.0], [0.0, 0.0, 0.0]]])  # (B=2, T=2, I=3)
    mask = torch.tensor([[True, True], [True, False]])
    act[1, 1] = 100.0  # a padding position: must not count
    assert ptl.neuron_score(act, mask).tolist() == [4.0, 3.0, 9.0]
    assert ptl.neuron_score(act, mask, fast.real_spans(mask)).tolist() == [4.0, 3.0, 9.0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=4), st.integers(0, 2**31))
def test_reading_rows_in_place_gives_the_gathered_score_and_odd_masks_fall_back(rows, seed):
    T = max(s + n for s, n in rows)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (s, n) in enumerate(rows):
        mask[b, s : s + n] = True
    act = torch.randn(len(rows), T, 7, generator=torch.Generator().manual_seed(seed))
    spans = fast.real_spans(mask)
    assert spans == [(s, s + n) for s, n in rows]
    assert torch.equal(ptl.neuron_score(act, mask, spans), ptl.neuron_score(act, mask))
    assert fast.real_spans(torch.tensor([[True, False, True]])) is None, "a gap: gather instead"
    assert fast.real_spans(torch.tensor([[True, True], [False, False]])) is None, "an empty row: gather instead"


def test_redundant_neurons_and_the_uniform_count_under_sigma():
    s = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.05, 0.9]])
    assert ptl.redundant_neurons(s, 0.25).tolist() == [[True, False, True], [False, True, False]]
    assert ptl.uniform_count(s, 0.25) == 1  # layer 1 has only one neuron under sigma
    assert ptl.uniform_count(s, 0.01) == 0


def test_layer_change_and_block_influence_goldens():
    h = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    f_h = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [-2.0, 0.0]]])
    torch.testing.assert_close(ptl.layer_change(h, f_h), torch.tensor([[4.0, math.sqrt(2), 3.0]]))
    torch.testing.assert_close(baselines.block_influence(h, f_h), torch.tensor([[1 - 0.6, 1.0, 2.0]]))
    assert ptl.layer_change(h, h).abs().max() == 0


def test_redundant_layers_and_lowest_break_ties_towards_lower_indices():
    assert ptl.redundant_layers(torch.tensor([0.3, 0.1, 0.2, 0.9]), 0.25) == [1, 2]
    assert ptl.lowest(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0]), 2).tolist() == [1, 2]


def test_released_rule_scores_candidates_zero_and_protects_language_neurons():
    # 1 layer, 3 parts, 4 neurons; n = 2 math samples. counts = samples with j in part p's bottom-n.
    counts = torch.tensor([[[2, 1, 0, 2],    # gate: C = {0, 3}
                            [1, 1, 0, 0],    # up:   C = {}
                            [0, 2, 1, 0]]])  # Act:  C = {1}
    assert baselines.released_scores(counts, 2).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    lang = torch.tensor([[[5, 0, 0, 0], [0, 5, 0, 0], [0, 5, 0, 5]]])  # n_lang = 5: G_gate={0}, G_up={1}, G_Act={1,3}
    # neuron 0: gate candidate but a gate language neuron -> up/Act give 1, 2 -> min 1
    # neuron 1: Act candidate but an Act language neuron -> gate 1, up inf -> 1
    # neuron 3: gate candidate, not a gate language neuron -> 0
    assert baselines.released_scores(counts, 2, lang, 5).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_protect_top_makes_the_most_general_neurons_unprunable():
    s = torch.tensor([[0.125, 0.25, 0.375, 0.5]])  # exact in binary
    general = torch.tensor([[9.0, 0.0, 1.0, 0.5]])
    assert baselines.protect_top(s, general, 0.5).tolist() == [[math.inf, 0.25, math.inf, 0.5]]
    assert torch.equal(baselines.protect_top(s, general, 0.0), s)


@pytest.mark.parametrize("order, expected", [
    ("neu-lay", ["neurons", "neurons", "layers", "layers"]),
    ("lay-neu", ["layers", "layers", "neurons", "neurons"]),
    ("alternate", ["neurons", "layers", "neurons", "layers"]),
])
def test_round_kinds_follow_the_order_of_table3(order, expected):
    left, kinds = {"neurons": 2, "layers": 2}, []
    while kind := ptl.next_kind(order, len(kinds) + 1, left):
        kinds.append(kind)
        left[kind] -= 1
    assert kinds == expected


def test_alternate_order_continues_with_what_is_left():
    assert ptl.next_kind("alternate", 2, {"neurons": 3, "layers": 0}) == "neurons"
    assert ptl.next_kind("neu-lay", 1, {"neurons": None, "layers": 5}) == "neurons"  # unbounded: rounds decide
    assert ptl.next_kind("neu-lay", 9, {"neurons": 0, "layers": 0}) is None


@settings(max_examples=20, deadline=None)
@given(ratio=st.floats(0.02, 0.4), layers=st.integers(0, 2), arch=st.sampled_from(["llama", "gemma2"]))
def test_neuron_budget_lands_exactly_on_the_parameter_target(ratio, layers, arch):
    model = tiny_model(arch, layers=4, inter=40)
    cfg = ptl.Config(target_ratio=ratio, layer_target=layers)
    P = count_params(model)["total"]
    k = ptl.neuron_budget(model, cfg)
    ptl.drop_layers(model, list(range(layers)))
    ptl.prune_neurons(model, [torch.arange(40 - k)] * (4 - layers))
    after = count_params(model)["total"]
    per_neuron_all_layers = (4 - layers) * 3 * model.config.hidden_size
    assert after <= (1 - ratio) * P, "the target is met"
    assert k == 0 or (1 - ratio) * P < after + per_neuron_all_layers, "by the fewest neurons that meet it"


def test_unreachable_targets_are_refused():
    model = tiny_model("llama", layers=4, inter=40)
    with pytest.raises(ValueError, match="out of reach"):
        ptl.neuron_budget(model, ptl.Config(target_ratio=0.99))
    with pytest.raises(ValueError, match="all 4 layers"):
        ptl.neuron_budget(model, ptl.Config(target_ratio=0.3, layer_target=4))


@pytest.mark.parametrize("kw, match", [
    (dict(neuron_step=0.0), "neuron-step"),
    (dict(target_ratio=1.0), "target-ratio"),
    (dict(layer_step=0), "layer-step"),
    (dict(target_ratio=0.0, rounds=0), "nothing bounds the loop"),
])
def test_bad_config_values_are_refused_with_the_flag_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ptl.Config(**kw)
