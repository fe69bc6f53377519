"""The loop end to end on tiny checkpoints: rounds, records, resume, refusal, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import baselines
import ptl
import ptl_common
from conftest import ARCHS, char_tokenizer, tiny_model
from ptl_common import count_params


def run(model: str, out, **kw) -> dict:
    kw = {"calib_samples": 8, "max_length": 48, "batch_size": 4, **kw}
    return ptl.main(ptl.Config(model=model, out=str(out), **kw))


def records(out) -> list[dict]:
    return [ptl_common.load_record(Path(out) / f"round_{t}") for t in ptl_common.finished_rounds(Path(out))]


def save(model, path) -> str:
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


MIXED = dict(rounds=3, order="alternate", layer_target=1, target_ratio=0.3, neuron_step=0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_rounds_write_smaller_checkpoints_that_from_pretrained_loads(arch, tiny_dirs, tmp_path):
    result = run(tiny_dirs[arch], tmp_path, **MIXED)
    recs = records(tmp_path)
    assert [r["kind"] for r in recs] == ["neurons", "layers", "neurons"] and result["rounds"] == 3
    sizes = []
    for r in recs:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"round_{r['round']}")
        assert count_params(model) == r["params_after"]
        assert model.config.num_hidden_layers == len(r["kept_layers"]) == len(r["kept_neurons"])
        assert model.config.intermediate_size == len(r["kept_neurons"][0])
        sizes.append(r["params_after"]["total"])
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < recs[0]["params_before"]["total"]
    # Original numbering: per layer, kept + removed over all rounds = every original neuron, once.
    last = recs[-1]
    assert sorted(last["kept_layers"] + [l for r in recs for l in r["removed_layers"]]) == list(range(4))
    for l, kept in zip(last["kept_layers"], last["kept_neurons"]):
        removed = [j for r in recs for j in r["removed_neurons"].get(str(l), [])]
        assert sorted(kept + removed) == list(range(40))


def test_a_resumed_run_ends_equal_to_an_uninterrupted_one(tiny_dirs, tmp_path):
    run(tiny_dirs["qwen2"], tmp_path / "resumed", **{**MIXED, "rounds": 1})
    run(tiny_dirs["qwen2"], tmp_path / "resumed", **MIXED)  # same command, more rounds: continues after round 1
    run(tiny_dirs["qwen2"], tmp_path / "straight", **MIXED)
    a, b = (load_file(tmp_path / d / "round_3" / "model.safetensors") for d in ("resumed", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "config")}  # noqa: E731
    assert [strip(r) for r in records(tmp_path / "resumed")] == [strip(r) for r in records(tmp_path / "straight")]


@pytest.mark.parametrize("damage", ["one tensor", "truncated", "no config", "bad record", "no checksums"])
def test_a_damaged_round_is_named_set_aside_and_redone_from_the_round_before(damage, tiny_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    run(tiny_dirs["llama"], tmp_path / "straight", rounds=2)
    run(tiny_dirs["llama"], tmp_path / "out", rounds=2)
    r2 = tmp_path / "out" / "round_2"
    if damage == "one tensor":  # finite values: nothing but the checksum can tell
        w = load_file(r2 / "model.safetensors")
        name = next(iter(w))
        save_file({**w, name: w[name] + 0.5}, r2 / "model.safetensors", metadata={"format": "pt"})
    elif damage == "truncated":
        data = (r2 / "model.safetensors").read_bytes()
        (r2 / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "no config":
        (r2 / "config.json").unlink()
    elif damage == "no checksums":  # then nothing could tell changed weights: the round counts as damaged
        (r2 / "checksums.json").unlink()
    else:
        (r2 / "ptl_record.json").write_text('{"round": 2, ')
    capsys.readouterr()
    run(tiny_dirs["llama"], tmp_path / "out", rounds=2)
    said = capsys.readouterr().out
    assert f"{r2} is damaged" in said and "resuming from the round before it" in said
    assert len(list((tmp_path / "out").glob("round_2.damaged-*"))) == 1, "set aside, not deleted"
    a, b = (load_file(tmp_path / d / "round_2" / "model.safetensors") for d in ("out", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a), "round 2 redone from round 1 equals the unbroken run"


def test_a_crash_while_saving_leaves_the_last_round_intact_and_a_rerun_finishes(tiny_dirs, tmp_path, monkeypatch):
    real_save, calls = ptl.save_checkpoint, []

    def crash_on_second(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            with ptl_common.atomic_dir(path) as tmp:  # dies half-way through writing round 2
                (tmp / "config.json").write_text("{}")
                raise KeyboardInterrupt
        return real_save(path, *a, **k)

    monkeypatch.setattr(ptl, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dirs["llama"], tmp_path, **MIXED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "round_1")
    monkeypatch.setattr(ptl, "save_checkpoint", real_save)
    assert run(tiny_dirs["llama"], tmp_path, **MIXED)["rounds"] == 3


def test_a_stale_temporary_directory_is_never_taken_for_a_round(tiny_dirs, tmp_path):
    stale = tmp_path / ".round_1.tmp-999"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    run(tiny_dirs["llama"], tmp_path, rounds=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1"]


def test_a_refused_round_leaves_the_previous_checkpoint_intact(tiny_dirs, tmp_path, monkeypatch):
    calls = []

    def scores(model, calib, protect, cfg, t):  # round 1: 3 neurons per layer under sigma; round 2: all of them
        L, I = model.config.num_hidden_layers, model.config.intermediate_size
        s = torch.ones(L, I)
        s[:, : 3 if not calls else I] = 0
        calls.append(1)
        return s, torch.ones(L)

    monkeypatch.setattr(ptl, "round_scores", scores)
    with pytest.raises(ValueError, match="would remove all 37 neurons"):
        run(tiny_dirs["llama"], tmp_path, target_ratio=0.0, sigma_neuron=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "round_1").config.intermediate_size == 37


def test_resuming_with_other_settings_is_refused(tiny_dirs, tmp_path):
    run(tiny_dirs["llama"], tmp_path, rounds=1)
    with pytest.raises(ValueError, match="other settings.*neuron_step"):
        run(tiny_dirs["llama"], tmp_path, rounds=2, neuron_step=0.2)


def test_the_same_out_spelled_another_way_resumes_the_same_run(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(tiny_dirs["llama"], "x", rounds=1)
    first = (tmp_path / "x" / "round_1" / "model.safetensors").read_bytes()
    run(tiny_dirs["llama"], "./x/", rounds=2)
    run(tiny_dirs["llama"], str(tmp_path / "x"), rounds=3)
    assert [r["round"] for r in records(tmp_path / "x")] == [1, 2, 3]
    assert (tmp_path / "x" / "round_1" / "model.safetensors").read_bytes() == first, "resumed, not redone"


def test_a_target_ratio_run_stops_at_the_target(tiny_dirs, tmp_path):
    result = run(tiny_dirs["gemma2"], tmp_path, target_ratio=0.2, neuron_step=0.15)
    steps = [r["neurons_per_layer"] for r in records(tmp_path)]
    assert steps[:-1] == [6] * (len(steps) - 1) and 3 <= steps[-1] < 9, "fixed steps, then the remainder"
    assert 0.2 <= result["removed_ratio"] < 0.2 + 3 * 32 * 4 / result["params"]["total"]


@pytest.mark.parametrize("budget, steps", [(23, [10, 13]), (25, [10, 10, 5]), (20, [10, 10]), (4, [4]), (0, [])])
def test_a_remainder_under_half_a_step_joins_the_last_neuron_round(budget, steps):
    """Width 40, step 0.25 = 10 neurons: 23 is 10 + 13 (the 3 left would cost a recovery round of their own),
    25 is 10 + 10 + 5 (half a step is a round), and a budget under one step is one round."""
    assert ptl.neuron_schedule(budget, 10) == steps
    cfg, s_neu = ptl.Config(neuron_step=0.25), torch.rand(2, 40)
    state, got = ptl.LoopState(0, {"intermediate_size": 40}, {"neurons": budget}), []
    while state.left["neurons"]:  # the loop's own removal() follows the schedule
        got.append(len(ptl.removal("neurons", s_neu, None, cfg, state)[0]))
        state.left["neurons"] -= got[-1]
        state.round += 1
    assert got == steps


def test_sigma_neuron_removes_exactly_the_never_active_neurons_then_stops(tmp_path):
    model = tiny_model("llama", layers=4, inter=40)
    with torch.no_grad():
        for layer in ptl_common.decoder_layers(model):
            ptl_common.ffn(layer)[1].weight[[5, 17, 30]] = 0  # Act = 0 for every token
    result = run(save(model, tmp_path / "m"), tmp_path / "out", target_ratio=0.0, sigma_neuron=0.0)
    assert result["rounds"] == 1, "round 2 finds nothing under sigma and the loop ends"
    assert records(tmp_path / "out")[0]["removed_neurons"] == {str(l): [5, 17, 30] for l in range(4)}


@pytest.mark.parametrize("variant", ["element", "vector"])
def test_the_taylor_rule_removes_neurons_without_weights_first_also_in_one_cut(variant, tmp_path):
    model = tiny_model("llama", layers=4, inter=40)
    with torch.no_grad():
        for layer in ptl_common.decoder_layers(model):
            gate, up, down = ptl_common.ffn(layer)
            gate.weight[[5, 17, 30]], up.weight[[5, 17, 30]], down.weight[:, [5, 17, 30]] = 0, 0, 0
    m = save(model, tmp_path / "m")
    run(m, tmp_path / "ptl", neuron_rule="taylor", taylor_variant=variant, neuron_step=3 / 40, rounds=1)
    run(m, tmp_path / "once", neuron_rule="taylor", taylor_variant=variant, baseline="prune-once", target_ratio=0.1)
    for out in ("ptl", "once"):
        removed = records(tmp_path / out)[0]["removed_neurons"]
        assert all({5, 17, 30} <= set(removed[str(l)]) for l in range(4)), out
    assert records(tmp_path / "ptl")[0]["removed_neurons"] == {str(l): [5, 17, 30] for l in range(4)}


def test_sigma_layer_removes_the_identity_layer(tmp_path):
    model = tiny_model("gemma2", layers=4, inter=40)
    layer = ptl_common.decoder_layers(model)[2]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        ptl_common.ffn(layer)[2].weight.zero_()
    run(save(model, tmp_path / "m"), tmp_path / "out", order="lay-neu", target_ratio=0.0, sigma_layer=1e-6, rounds=1)
    rec = records(tmp_path / "out")[0]
    assert rec["removed_layers"] == [2] and rec["scores"]["layer"][2] == 0


@pytest.mark.parametrize("rule", ["eq4", "released"])
def test_language_protection_keeps_the_protected_neurons(rule, tiny_dirs, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("The river flows past the old mill.\nShe read the letter twice before answering.\n" * 4)
    run(tiny_dirs["llama"], tmp_path / "out", rounds=1, neuron_rule=rule, protect_data=str(general),
        **({"protect_frac": 0.25} if rule == "eq4" else {"released_top_n": "0.5"}))
    s = load_file(tmp_path / "out" / "round_1" / "scores.safetensors")["neuron_scores"]
    rec = records(tmp_path / "out")[0]
    assert s.isinf().any(), "some neurons are protected"
    if rule == "eq4":
        assert (s.isinf().sum(1) == 10).all(), "a quarter of each layer's 40 neurons"
    for l, removed in rec["removed_neurons"].items():
        assert not s[int(l), removed].isinf().any()


def released_procedure(model, tok, math: list[str], english: list[str], n: int, k: int) -> dict[int, list[int]]:
    """The authors' released selection, written out from their scripts (neuron_detection_*, neuron_deletion_*,
    customed_model/*.py) and independent of ptl.score_pass: one text at a time, tokenizer(text) and a copy of its
    last token, hooks on gate_proj's and up_proj's outputs and down_proj's input at position -1, topk(n) per text
    (smallest for math, largest for English), intersected over texts; per part, math sets minus English sets;
    the union of the parts; the k lowest indices. -> {layer: removed neurons}"""
    def sets(texts: list[str], largest: bool) -> dict:
        common = {}
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, ids[:, -1:]], dim=1)  # their generate(): input_ids + input_ids[:, -1:]
            seen, handles = {}, []
            for l, layer in enumerate(ptl_common.decoder_layers(model)):
                gate, up, down = ptl_common.ffn(layer)
                handles += [gate.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__((l, 0), o[0, -1])),
                            up.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__((l, 1), o[0, -1])),
                            down.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__((l, 2), a[0][0, -1]))]
            with torch.no_grad():
                model(input_ids=ids)
            for h in handles:
                h.remove()
            for key, v in seen.items():
                top = set(torch.topk(v, n, largest=largest).indices.tolist())
                common[key] = top if key not in common else common[key] & top
        return common

    m, e = sets(math, largest=False), sets(english, largest=True)
    L = len(ptl_common.decoder_layers(model))
    candidates = {l: sorted(set().union(*(m[l, p] - e[l, p] for p in range(3)))) for l in range(L)}
    assert all(len(c) >= k for c in candidates.values()), "their code needs k candidates per layer"
    return {l: c[:k] for l, c in candidates.items()}


def test_the_released_rule_removes_what_the_authors_procedure_removes(tmp_path):
    model, tok = tiny_model("llama", layers=4, inter=40, seed=3), char_tokenizer()
    math = ["Question: 12 + 7 = ? Answer: 19", "Question: 3 * 4 = ? Answer: 12", "Question: 9 - 5 = ? Answer: 4"]
    english = ["The river flows past the old mill.", "She read the letter twice.", "Rain fell on the roofs."]
    data = write(tmp_path / "math.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in math))
    general = write(tmp_path / "en.txt", "\n".join(english))
    run(save(model, tmp_path / "m"), tmp_path / "out", rounds=1, target_ratio=0.0, neuron_rule="released",
        neuron_step=0.1, calib_data=data, calib_samples=3, protect_data=general, released_top_n="30")
    want = released_procedure(model, tok, math, english, n=30, k=4)
    assert records(tmp_path / "out")[0]["removed_neurons"] == {str(l): r for l, r in want.items()}


def test_the_released_rule_reads_the_appended_copy_of_the_last_token():
    batch = {"input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                       [1, 1, 1, 1]])}
    out = baselines.append_last_token(batch)
    assert out["input_ids"][0, :4].tolist() == [1, 5, 6, 6] and out["input_ids"][1].tolist() == [1, 7, 8, 9, 9]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_the_released_rule_takes_its_n_and_fresh_texts_round_by_round(tmp_path):
    cfg = ptl.Config(neuron_rule="released", released_top_n="12000,12000,11000")
    assert [cfg.top_n(t) for t in (1, 2, 3, 4)] == [12000, 12000, 11000, 11000]
    assert baselines.top_count(0.5, 40) == 20 and baselines.top_count(30, 40) == 30
    with pytest.raises(ValueError, match="leaves no neuron"):
        baselines.top_count(40, 40)
    with pytest.raises(ValueError, match="fractions in"):
        ptl.Config(neuron_rule="released", released_top_n="1.5")
    with pytest.raises(ValueError, match="give --protect-samples"):
        ptl.Config(calib_per_round=True, protect_data="en.txt")
    model = tiny_model("llama", layers=4, inter=40)
    run(save(model, tmp_path / "m"), tmp_path / "fresh", rounds=2, target_ratio=0.0, neuron_rule="released",
        calib_samples=4, calib_per_round=True, released_top_n="20,16")
    assert [r["calibration"]["rows"] for r in records(tmp_path / "fresh")] == [[0, 4], [4, 8]]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content, match", [
    ('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n', r"calib.jsonl:2: not valid JSON"),
    ('{"question": "1+1?", "answer": "2"}\n{"prompt": "x"}\n', r"calib.jsonl:2: record has fields \['prompt'\]"),
    ('[1, 2]\n', r"calib.jsonl:1: expected a JSON object"),
    ("\n\n", r"calib.jsonl is empty"),
    ('{"question": "1+1?", "answer": "2"}\n{"question": 1, "answer": "2"}\n',
     r"calib.jsonl:2: field `question` is int"),
    ('{"text": "a sum"}\n{"text": "   "}\n', r"calib.jsonl:2: field `text` is empty"),
])
def test_malformed_calibration_data_names_the_file_and_line(content, match, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match=match):
        run(tiny_dirs["llama"], tmp_path / "out", rounds=1, calib_data=write(tmp_path / "calib.jsonl", content))
    assert not list((tmp_path / "out").glob("round_*"))


@pytest.mark.parametrize("name", ["calib.jsonl", "calib.txt"])
def test_binary_calibration_data_names_the_file_and_line(name, tiny_dirs, tmp_path):
    (tmp_path / name).write_bytes(b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\x00\x00\n')
    with pytest.raises(ValueError, match=f"{name}:2: not UTF-8 text"):
        run(tiny_dirs["llama"], tmp_path / "out", rounds=1, calib_data=str(tmp_path / name))


def test_a_missing_model_or_data_file_gives_a_clear_error(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        run(str(tmp_path / "nope"), tmp_path / "out", rounds=1)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        run(str(tmp_path), tmp_path / "out", rounds=1)
    with pytest.raises(ValueError, match=f"--calib-data {tmp_path / 'missing.jsonl'}: no such file"):
        run(tiny_dirs["llama"], tmp_path / "out", rounds=1, calib_data=str(tmp_path / "missing.jsonl"))


def test_an_unsupported_checkpoint_is_refused_by_name(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        run(str(tmp_path / "m"), tmp_path / "out", rounds=1)


def test_a_round_record_holds_the_removed_and_kept_units_scores_sizes_and_config(tiny_dirs, tmp_path):
    run(tiny_dirs["llama"], tmp_path, rounds=1)
    rec = json.loads((tmp_path / "round_1" / "ptl_record.json").read_text())
    assert {"removed_neurons", "removed_layers", "scores", "params_before", "params_after", "config",
            "kept_neurons", "kept_layers", "dense", "time_s"} <= rec.keys()
    assert rec["config"]["model"] == tiny_dirs["llama"]
    assert len(rec["scores"]["sigma_neuron_effective"]) == 4


CPT = dict(rounds=2, recovery="cpt", cpt_flags="--samples 16 --max-length 32 --global-batch 4 --micro-batch 2 "
                                               "--lr 1e-3 --max-steps 6 --save-every 2")


def test_cpt_recovery_trains_every_round_on_its_own_slice_of_the_data(tiny_dirs, tmp_path):
    run(tiny_dirs["llama"], tmp_path / "cpt", **CPT)
    run(tiny_dirs["llama"], tmp_path / "none", rounds=2)
    recs = records(tmp_path / "cpt")
    assert [r["recovery"]["cpt"]["rows"] for r in recs] == [[0, 16], [16, 32]]
    assert all(r["recovery"]["cpt"]["steps"] == 6 and r["recovery"]["cpt"]["time_s"] > 0 for r in recs)
    assert sorted(p.name for p in (tmp_path / "cpt").iterdir()) == ["round_1", "round_2"], "work dirs are removed"
    assert len((tmp_path / "cpt" / "round_1" / "cpt_metrics.jsonl").read_text().splitlines()) == 6
    trained, pruned = (load_file(tmp_path / d / "round_2" / "model.safetensors") for d in ("cpt", "none"))
    assert not torch.equal(trained["model.norm.weight"], pruned["model.norm.weight"]), "recovery changed the weights"


def test_the_loop_measures_each_round_pruned_and_recovered_and_ends_with_a_summary(tiny_dirs, tmp_path, capsys):
    out, kw = tmp_path / "run", {**CPT, "cpt_flags": CPT["cpt_flags"].replace("--max-steps 6", "--max-steps 2"),
                                 "eval_every_round": True,
                                 "eval_flags": "--tasks offline --limit 3 --metrics gold_logprob"}
    run(tiny_dirs["llama"], out, **kw)
    recs = records(out)
    assert all("gold_logprob" in r["eval_pruned"]["offline"] and "gold_logprob" in r["eval"]["offline"] for r in recs)
    assert recs[0]["eval_pruned"]["offline"]["gold_logprob"] != recs[0]["eval"]["offline"]["gold_logprob"]
    said = capsys.readouterr().out
    assert "dense: offline gold log-prob" in said and said.count("| pruned: offline") == 2, said
    tail = said[said.index("done: "):]
    assert "removed) in 2 rounds" in tail and "round 2: recovered: offline gold log-prob" in tail
    assert f"{out}/round_1 .. round_2" in tail and "python evaluate.py --report" in tail
    assert "reading: \"pruned\" is a round right after its cut, which follows the previous round's recovery" in tail
    assert f"--compare {out}/round_2 --tasks offline --limit 100 --metrics gold_logprob" in tail, "rounds evaluated"
    capsys.readouterr()
    run(tiny_dirs["llama"], out, **kw)
    assert f"nothing left to do; the last round is {out}/round_2" in capsys.readouterr().out


def test_a_ptl_run_killed_during_recovery_resumes_and_ends_as_an_unbroken_one(tiny_dirs, tmp_path, monkeypatch):
    import recover

    real, calls = recover.cosine_lr, []

    def killed(step, *a):  # round 2's recovery dies after its step-2 checkpoint
        calls.append(step)
        if len(calls) == 6 + 3:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(recover, "cosine_lr", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dirs["llama"], tmp_path / "resumed", **CPT)
    assert (tmp_path / "resumed" / ".recovery_round_2" / "cpt" / "checkpoints" / "step_2").exists()
    monkeypatch.setattr(recover, "cosine_lr", real)
    run(tiny_dirs["llama"], tmp_path / "resumed", **CPT)
    run(tiny_dirs["llama"], tmp_path / "straight", **CPT)
    a, b = (load_file(tmp_path / d / "round_2" / "model.safetensors") for d in ("resumed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "resumed")[1]["recovery"]["cpt"]["resumed_at"] == 2


def test_cpt_recovery_without_a_per_round_size_is_refused(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="--samples N"):
        run(tiny_dirs["llama"], tmp_path, rounds=1, recovery="cpt", cpt_flags="--max-length 32")


def test_cpt_then_grpo_recover_every_round_in_the_order_of_algorithm_1(tiny_dirs, tmp_path):
    grpo_flags = ("--samples 8 --rollout-batch 4 --group-size 2 --max-response-length 4 --max-steps 2 "
                  "--micro-batch 8 --max-prompt-length 512 --lr 1e-3")
    run(tiny_dirs["llama"], tmp_path, **{**CPT, "recovery": "cpt+grpo", "grpo_flags": grpo_flags})
    recs = records(tmp_path)
    assert [list(r["recovery"]) for r in recs] == [["cpt", "grpo"]] * 2
    assert [r["recovery"]["grpo"]["rows"] for r in recs] == [[0, 8], [8, 16]]
    assert recs[0]["recovery"]["grpo"]["prompt_style"] == "fewshot"
    assert all((tmp_path / "round_2" / f"{k}_metrics.jsonl").exists() for k in ("grpo", "cpt"))


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_once_ends_at_the_same_architecture_as_ptl_in_one_round(arch, tiny_dirs, tmp_path):
    target = dict(target_ratio=0.3, layer_target=1)
    ptl_run = run(tiny_dirs[arch], tmp_path / "ptl", neuron_step=0.1, **target)
    once = run(tiny_dirs[arch], tmp_path / "once", baseline="prune-once", **target)
    assert ptl_run["rounds"] > 2 and once["rounds"] == 1
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / f"round_{r['rounds']}").config
            for d, r in (("ptl", ptl_run), ("once", once)))
    assert a.to_diff_dict() == b.to_diff_dict() and ptl_run["params"] == once["params"]
    rec = records(tmp_path / "once")[0]
    assert rec["kind"] == "prune-once" and len(rec["removed_layers"]) == 1 and rec["neurons_per_layer"] > 0


def test_shortgpt_removes_exactly_the_lowest_block_influence_layers_in_one_round(tmp_path):
    model = tiny_model("llama", layers=6, inter=40)
    with torch.no_grad():
        for l in (1, 4):  # f_l(h) = h: Block Influence 1 - cos(h, h) = 0, the lowest possible
            ptl_common.decoder_layers(model)[l].self_attn.o_proj.weight.zero_()
            ptl_common.ffn(ptl_common.decoder_layers(model)[l])[2].weight.zero_()
        for l in (0, 2, 3, 5):  # the others change h clearly
            ptl_common.ffn(ptl_common.decoder_layers(model)[l])[2].weight.mul_(20)
    per_layer = sum(p.numel() for p in ptl_common.decoder_layers(model)[0].parameters())
    ratio = 1.5 * per_layer / count_params(model)["total"]  # more than one layer's worth: two must go
    result = run(save(model, tmp_path / "m"), tmp_path / "out", baseline="shortgpt", target_ratio=ratio)
    rec = records(tmp_path / "out")[0]
    assert result["rounds"] == 1 and rec["kind"] == "shortgpt" and rec["layer_rule"] == "bi"
    assert rec["removed_layers"] == [1, 4] and rec["removed_neurons"] == {}
    assert rec["scores"]["layer"][1] == pytest.approx(0, abs=1e-6)
    assert rec["scores"]["layer"][4] == pytest.approx(0, abs=1e-6)


def test_a_baseline_without_a_size_is_refused():
    with pytest.raises(ValueError, match="needs a size, --target-ratio"):
        ptl.Config(baseline="shortgpt", target_ratio=0.0, rounds=1)


@pytest.mark.parametrize("rule", ["distance", "bi", "ppl", "taylor"])
def test_every_layer_criterion_ranks_an_identity_layer_least_important(rule, tmp_path):
    model = tiny_model("llama", layers=4, inter=40)
    with torch.no_grad():
        ptl_common.decoder_layers(model)[2].self_attn.o_proj.weight.zero_()  # f_2(h) = h
        ptl_common.ffn(ptl_common.decoder_layers(model)[2])[2].weight.zero_()
    run(save(model, tmp_path / "m"), tmp_path / "out", order="lay-neu", layer_rule=rule, layer_target=1,
        target_ratio=0.0, rounds=1)
    rec = records(tmp_path / "out")[0]
    s = rec["scores"]["layer"]
    assert rec["removed_layers"] == [2] and s[2] == pytest.approx(0, abs=1e-6) and min(s[:2] + s[3:]) > 1e-4


def test_a_run_resumes_whether_its_model_directory_is_spelled_with_a_trailing_slash_or_not(tiny_dirs, tmp_path):
    run(tiny_dirs["llama"] + "/", tmp_path / "out", rounds=1, target_ratio=0.0)
    assert run(tiny_dirs["llama"], tmp_path / "out", rounds=2, target_ratio=0.0)["rounds"] == 2
