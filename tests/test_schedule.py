"""One recovery schedule across rounds (--recovery-schedule continuous) and a removal plan applied at once
(--apply-removal): splitting recovery by itself changes nothing, and a cut carries AdamW's moments exactly."""
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ptl
import recover
import trainer
from conftest import ARCHS, char_tokenizer, tiny_model
from data import load_texts
from models import load_model

CPT = "--samples 8 --max-length 32 --global-batch 4 --micro-batch 2 --lr 3e-3 --warmup-ratio 0.2"
SHAPE = dict(target_ratio=0.3, layer_target=1, neuron_step=0.1, calib_samples=8, max_length=48, batch_size=4)


def run(model: str, out, **kw) -> dict:
    return ptl.main(ptl.Config(model=model, out=str(out), **{**SHAPE, **kw}))


def final_weights(out) -> dict:
    return load_file(Path(out) / f"round_{max(int(p.name[6:]) for p in Path(out).glob('round_*'))}" /
                     "model.safetensors")


def test_windows_of_a_run_with_moments_carried_end_equal_to_the_whole_run(tmp_path):
    texts, kw = load_texts("offline", n=24, seed=0), dict(max_length=32, global_batch=4, micro_batch=2, lr=3e-3,
                                                         warmup_ratio=0.25)
    whole = recover.train(tiny_model("llama", layers=2), char_tokenizer(), texts,
                          recover.Config(out=str(tmp_path / "whole"), **kw))
    model, moments, lrs = tiny_model("llama", layers=2), None, []
    for t in (1, 2, 3):
        res = recover.train(model, char_tokenizer(), texts,
                            recover.Config(out=str(tmp_path / f"w{t}"), window=f"{t}/3", **kw), moments)
        model, moments = res["model"], res["moments"]
        lrs += [r["lr"] for r in map(eval, (tmp_path / f"w{t}" / "metrics.jsonl").read_text().splitlines())]
    assert [r["lr"] for r in map(eval, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())] == lrs
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "w3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the same weights, bit for bit"
    assert sum(recover.window_steps(f"{t}/3", whole["steps"])[1] - recover.window_steps(f"{t}/3", whole["steps"])[0]
               for t in (1, 2, 3)) == whole["steps"]
    again = recover.train(tiny_model("llama", layers=2), char_tokenizer(), texts,
                          recover.Config(out=str(tmp_path / "w3"), window="3/3", **kw), moments)
    assert all(torch.equal(again["moments"][n][k], moments[n][k]) for n in moments for k in moments[n]), \
        "a finished window returns its moments from disk"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_cut_carries_the_moments_of_kept_rows_columns_and_layers_exactly_and_drops_removed_ones(arch):
    model = tiny_model(arch, layers=4, inter=12)
    L, I = 4, 12
    state = ptl.LoopState(0, {}, {"neurons": None, "layers": None}, list(range(L)), [list(range(I))] * L)
    # moments that are the weights themselves: after the cut they must equal the cut model's weights
    moments = {n: {"step": torch.tensor(5.0), "exp_avg": p.detach().clone(), "exp_avg_sq": p.detach() ** 2}
               for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for kind, what in (("neurons", [torch.randperm(I, generator=g)[:3] for _ in range(L)]), ("layers", [1]),
                       ("neurons", [torch.randperm(I - 3, generator=g)[:2] for _ in range(L - 1)]), ("layers", [0, 2])):
        before = copy.deepcopy(state)
        ptl.apply_removal(model, kind, what, state)
        moments = trainer.carry_moments(moments, model, before, state)
        params = dict(model.named_parameters())
        assert moments.keys() == params.keys(), "a removed layer's moments are gone, a kept one's renamed"
        for n, p in params.items():
            assert torch.equal(moments[n]["exp_avg"], p) and torch.equal(moments[n]["exp_avg_sq"], p ** 2), n
            assert moments[n]["step"] == 5
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 7


def test_a_continuous_run_whose_cuts_remove_nothing_ends_equal_to_one_recover_run(tiny_dirs, tmp_path, monkeypatch):
    def remove_nothing(model, kind, s_neu, s_lay, cfg, state):  # the schedule's bookkeeping, no surgery
        what = ptl.removal(kind, s_neu, s_lay, cfg, state)
        state.left[kind] -= len(what[0]) if kind == "neurons" else len(what)
        return {"removed_neurons": {}, "removed_layers": [], "neurons_per_layer": 0}

    monkeypatch.setattr(ptl, "prune_round", remove_nothing)
    res = run(tiny_dirs["llama"], tmp_path / "ptl", recovery="cpt", cpt_flags=CPT, recovery_schedule="continuous")
    T = res["rounds"]
    windows = [r["recovery"]["cpt"]["window"] for r in res["records"]]
    model, tok = load_model(tiny_dirs["llama"], dtype="float32")
    one = recover.train(model, tok, load_texts("offline", n=8 * T, seed=0),
                        ptl.parse_config(recover.Config, CPT.split() + ["--out", str(tmp_path / "one")]))
    assert T > 2 and windows == [[w[0], w[1]] for w in windows] and windows[0][0] == 0
    assert [w[1] for w in windows[:-1]] == [w[0] for w in windows[1:]] and windows[-1][1] == one["steps"]
    a, b = final_weights(tmp_path / "ptl"), load_file(tmp_path / "one" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b), "splitting recovery across rounds, by itself, changes nothing"


def test_a_killed_continuous_run_resumes_and_ends_equal_to_an_unbroken_one(tiny_dirs, tmp_path):
    kw = dict(recovery="cpt", cpt_flags=CPT, recovery_schedule="continuous")
    whole = run(tiny_dirs["qwen2"], tmp_path / "whole", **kw)
    run(tiny_dirs["qwen2"], tmp_path / "split", rounds=2, **kw)  # stopped after round 2, as a kill would
    assert (tmp_path / "split" / "round_2" / "moments.safetensors").exists()
    split = run(tiny_dirs["qwen2"], tmp_path / "split", **kw)
    assert split["rounds"] == whole["rounds"] > 2
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_plan_applied_at_once_gives_the_model_its_rounds_gave_without_recovery(tiny_dirs, tmp_path):
    rounds = run(tiny_dirs["gemma2"], tmp_path / "rounds", order="alternate")
    plan = run(tiny_dirs["gemma2"], tmp_path / "plan", apply_removal=str(tmp_path / "rounds" /
                                                                         f"round_{rounds['rounds']}"),
               **{k: ptl.FIELDS[k].default for k in SHAPE})
    assert rounds["rounds"] > 2 and plan["rounds"] == 1 and plan["records"][0]["kind"] == "plan"
    a, b = final_weights(tmp_path / "rounds"), final_weights(tmp_path / "plan")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = plan["records"][0]
    assert (last["kept_layers"], last["kept_neurons"]) == (rounds["records"][-1]["kept_layers"],
                                                           rounds["records"][-1]["kept_neurons"])


@pytest.mark.parametrize("kw, match", [
    (dict(recovery_schedule="continuous", recovery="none"), "needs --recovery cpt"),
    (dict(recovery_schedule="continuous", recovery="cpt", cpt_flags=CPT, sigma_neuron=0.1), "without sigma"),
    (dict(apply_removal="/nonexistent/round_3"), "not a finished round"),
    (dict(apply_removal="/nonexistent/round_3", baseline="prune-once"), "give one"),
    (dict(apply_removal="/nonexistent/round_3", neuron_step=0.2), "--neuron-step would be ignored"),
])
def test_a_schedule_or_plan_that_cannot_work_is_refused_before_any_model_loads(kw, match):
    with pytest.raises(ValueError, match=match):
        ptl.Config(**({} if "apply_removal" in kw else SHAPE), **kw)


def test_a_plan_made_on_another_shape_is_refused(tiny_dirs, tmp_path):
    run(tiny_dirs["llama"], tmp_path / "rounds", rounds=1)
    other = tmp_path / "other"
    tiny_model("llama", layers=3, inter=40).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="plan was made on 4 layers x 40"):
        ptl.main(ptl.Config(model=str(other), out=str(tmp_path / "p"), apply_removal=str(tmp_path / "rounds" /
                                                                                      "round_1")))
