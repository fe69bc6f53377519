"""Bad input gets one clear line (`script.py: error: ...`, exit status 2; the traceback only with --debug), before
any model loads, and nothing runs on silently."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import grpo
import models
import ptl
import ptl_common
import recover

ev = ptl_common.import_evaluate()
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, argv, message", [
    (ptl, ["--rounds", "-1"], "--rounds -1 (need >= 0)"),
    (ptl, ["--sigma-neuron", "-1"], "--sigma-neuron -1.0 (need >= 0)"),
    (ptl, ["--calib-samples", "-1"], "--calib-samples -1 (need > 0)"),
    (ptl, ["--batch-size", "0"], "--batch-size 0 (need > 0)"),
    (recover, ["--max-steps", "-1"], "--max-steps -1 (need >= 0)"),
    (recover, ["--samples", "-5"], "--samples -5 (need >= 0)"),
    (grpo, ["--max-steps", "-1"], "--max-steps -1 (need >= 0)"),
    (grpo, ["--samples", "-1", "--data-offset", "-2"], "--samples -1 (need >= 0), --data-offset -2 (need >= 0)"),
    (ev, ["--limit", "-1"], "--limit -1 (need >= 0)"),
    (ev, ["--batch-size", "0"], "--batch-size 0 (need > 0)"),
    (recover, ["--lr", "inf"], "--lr inf (need a finite number)"),
    (recover, ["--warmup-ratio", "5"], "--warmup-ratio 5.0 (need within [0, 1])"),
    (grpo, ["--acc-weight", "nan"], "--acc-weight nan (need a finite number)"),
    (grpo, ["--max-grad-norm", "-1"], "--max-grad-norm -1.0 (need > 0)"),
    (grpo, ["--format-weight", "-1"], "--format-weight -1.0 (need >= 0)"),
])
def test_a_value_out_of_range_is_one_line_and_exit_status_2(module, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        ptl_common.run_cli(module.main, module.Config, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"error: out of range: {message}" in err, err


def test_debug_shows_the_traceback_instead():
    with pytest.raises(ValueError, match="--rounds -1"):
        ptl_common.run_cli(ptl.main, ptl.Config, ["--rounds", "-1", "--debug"])


def test_the_scripts_report_a_user_error_in_one_line_before_loading_a_model():
    p = subprocess.run([sys.executable, "ptl.py", "--released-top-n", "abc"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("ptl.py: error: --released-top-n 'abc'"), p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0


def test_bench_recover_refuses_too_little_data_for_its_steps_before_any_model_loads():
    """Both trainers would wrap into a second epoch, in different orders: their losses would part for no reason
    either trainer owns (seen: 6.1e-2 at step 3 with --samples 32)."""
    p = subprocess.run([sys.executable, "scripts/bench_recover.py", "--samples", "32", "--steps", "3"], cwd=ROOT,
                       capture_output=True, text=True)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and err.startswith("bench_recover.py: error: --samples 32 packs into 15 blocks"), p.stderr
    assert "fewer than the 24" in err and "Traceback" not in p.stderr


@pytest.mark.parametrize("kw, message", [
    (dict(baseline="shortgpt", target_ratio=0.2, neuron_step=0.1), "--neuron-step would be ignored"),
    (dict(baseline="prune-once", target_ratio=0.2, order="alternate"), "--order would be ignored"),
    (dict(recovery="cpt", cpt_flags="--samples 4 --bogus 1"), "--cpt-flags: unrecognized arguments: --bogus 1"),
    (dict(recovery="cpt", cpt_flags="--samples 4 --lr -1"), r"--cpt-flags: out of range: --lr -1.0 \(need > 0\)"),
    (dict(recovery="cpt", cpt_flags="--lr 1e-5"), "needs a data size per round"),
    (dict(recovery="grpo", grpo_flags="--samples 8 --top-p 2"), "--grpo-flags: --top-p 2.0"),
    (dict(eval_every_round=True, eval_flags="--tasks gsm9k"), "unknown benchmark 'gsm9k'"),
    (dict(recovery="cpt", cpt_flags="--samples 4 --ckpt-policy matmuls"), "--ckpt-policy matmuls .* add --grad-ckpt"),
])
def test_ptl_refuses_flags_that_would_be_ignored_or_fail_later_before_any_model_loads(kw, message):
    with pytest.raises(ValueError, match=message):
        ptl.Config(**kw)


@pytest.mark.parametrize("module, kw, message", [
    (recover, dict(lr=1e30), "--lr 1e[+]30: AdamW moves every weight by about lr per step; need <= 1"),
    (grpo, dict(clip_low=-1.0), "need 0 <= --clip-low < 1"),
    (grpo, dict(dual_clip=0.5), "--dual-clip 0.5: .* need > 1"),
    (grpo, dict(acc_weight=0.0, format_weight=0.0), "every reward would be 0"),
    (grpo, dict(mini_batches=4, rollout_batch=2, group_size=2, micro_batch=4), "--mini-batches 4 must divide the 1 "),
    (ptl, dict(taylor_variant="vector"), "--taylor-variant [(]read only with --neuron-rule taylor[)]"),
    (ptl, dict(cpt_flags="--samples 3"), "--cpt-flags [(]read only with --recovery cpt or cpt[+]grpo[)]"),
    (ptl, dict(recovery="cpt", cpt_flags="--samples 3", grpo_flags="--samples 3"), "--grpo-flags [(]read only"),
    (ptl, dict(eval_flags="--tasks bogus"), "--eval-flags [(]read only with --eval-every-round[)]"),
    (ptl, dict(sigma_neuron=0.1, neuron_step=0.2), "--neuron-step [(]read only without --sigma-neuron"),
    (ptl, dict(released_top_n="0.5"), "--released-top-n [(]read only with --neuron-rule released[)]"),
    (ptl, dict(protect_data="x.txt", protect_samples=3, neuron_rule="released", protect_frac=0.2), "--protect-frac"),
    (ptl, dict(baseline="shortgpt", calib_per_round=True), "--calib-per-round [(]read only in PTL's rounds"),
    (ev, dict(lm_eval_tasks="mine"), "--lm-eval-tasks [(]read only with --engine lm-eval[)]"),
    (ev, dict(include_path="/nonexistent"), "--include-path [(]read only with --engine lm-eval[)]"),
    (ev, dict(report="out/x", limit=3), "--limit [(]read only when evaluating models, not with --report[)]"),
    (ev, dict(tasks=",,"), "--tasks ',,' names no benchmark"),
])
def test_a_value_without_meaning_or_a_flag_the_mode_ignores_is_refused_by_name(module, kw, message):
    with pytest.raises(ValueError, match=message):
        module.Config(**kw)


@pytest.mark.parametrize("module", [ptl, recover, grpo])
def test_an_out_inside_the_model_it_reads_is_refused(module, tiny_dirs):
    for out in (tiny_dirs["llama"], f"{tiny_dirs['llama']}/trained", f"{tiny_dirs['llama']}/"):
        with pytest.raises(ValueError, match="inside --model .* would write over the model it reads"):
            module.Config(model=tiny_dirs["llama"], out=out)


def test_an_update_that_leaves_a_weight_non_finite_stops_the_run_and_saves_nothing(tmp_path, monkeypatch):
    from conftest import char_tokenizer, tiny_model

    step = recover.train_step

    def diverge(net, *a, **k):  # a finite loss, then an update that overflows one weight
        out = step(net, *a, **k)
        next(net.parameters()).data[0, 0] = float("inf")
        return out

    monkeypatch.setattr(recover, "train_step", diverge)
    cfg = recover.Config(out=str(tmp_path), max_length=32, global_batch=2, micro_batch=2, max_steps=2, save_every=1)
    with pytest.raises(FloatingPointError, match="weights are not finite after the last update"):
        recover.train(tiny_model("llama", layers=1), char_tokenizer(), data.load_texts("offline", n=8, seed=0),
                      cfg)
    assert not (tmp_path / "model.safetensors").exists() and not list((tmp_path / "checkpoints").glob("step_*"))


def test_a_model_with_non_finite_weights_is_refused_where_it_loads(tmp_path):
    import torch

    from conftest import char_tokenizer, tiny_model

    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1 weight tensors hold NaN or inf .first: model.norm.weight."):
        models.load_model(str(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     "is damaged .SafetensorError"),
    (lambda d: (d / "config.json").write_text("{not json"), "is damaged .JSONDecodeError"),
    (lambda d: [f.unlink() for f in d.glob("tokenizer*")], "has no tokenizer"),
])
def test_a_damaged_checkpoint_is_named_in_one_line(damage, message, tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(tiny_dirs["llama"], tmp_path / "m")
    damage(tmp_path / "m")
    with pytest.raises((ValueError, FileNotFoundError), match=f"checkpoint {tmp_path / 'm'} {message}") as e:
        models.load_model(str(tmp_path / "m"))
    assert "\n" not in str(e.value)


def test_a_damaged_resumable_checkpoint_is_named_and_not_resumed_from(tmp_path):
    import torch

    from conftest import tiny_model
    import trainer

    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match=f"{tmp_path / 'step_2' / 'state.pt'} is damaged .*delete"):
        trainer.load_state(tmp_path / "step_2", model, torch.optim.AdamW(model.parameters()))


def test_grpo_refuses_prompts_its_length_limit_would_cut_and_empty_questions():
    from conftest import char_tokenizer

    with pytest.raises(ValueError, match="--max-prompt-length 5: 1 of the 2 prompts are longer .the longest: 11"):
        grpo.check_prompt_lengths(char_tokenizer(), ["abc", "abcdefghij"], grpo.Config(max_prompt_length=5))
    with pytest.raises(ValueError, match="data.jsonl:3: .* needs a non-empty question"):
        data.question_answer({"question": " ", "answer": "3"}, "data.jsonl:3")


def test_evaluate_checks_every_benchmark_file_and_its_out_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    loads = []
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(FileNotFoundError, match="must hold math500/test.jsonl"):
        ev.main(ev.Config(model="smollm2-135m", tasks="gsm8k,math500", data_dir=str(tmp_path)))
    assert not loads, "no model was loaded for a run that could not finish"
    with pytest.raises(ValueError, match="is a directory"):
        ev.Config(out=str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        ev.Config(tasks="gsm8k,gsm9k")


def test_a_full_disk_says_so_with_the_path_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 0))
    with pytest.raises(OSError, match=f"no space left on device while writing {tmp_path / 'round_3'}"):
        with ptl_common.atomic_dir(tmp_path / "round_3") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert list(tmp_path.iterdir()) == [], "no partial directory is left"


def test_every_flag_of_every_script_says_what_it_does():
    import dataclasses

    sys.path.insert(0, str(ROOT / "scripts"))
    import gradual
    import gradual_stats
    import recipes

    for m in (ptl, recover, grpo, ev, gradual, gradual_stats, recipes):
        missing = [f.name for f in dataclasses.fields(m.Config) if not f.metadata.get("help", "").strip()]
        assert not missing, f"{m.__name__}: --{', --'.join(missing)} have no help text"


def test_offline_a_hub_name_fails_at_once_in_one_line_naming_what_to_pass_instead(monkeypatch, capsys, tiny_dirs,
                                                                                    tmp_path):
    import time

    monkeypatch.setattr(models, "hub_unreachable", lambda: True)
    for argv, hint in ((["--model", "someorg/not-a-model"], "use --model smollm2-135m"),
                       (["--model", tiny_dirs["llama"], "--calib-data", "someorg/not-a-dataset"], "use `offline`")):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            ptl_common.run_cli(ptl.main, ptl.Config, [*argv, "--rounds", "1", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and ": error: " in err[-1] and hint in err[-1], err
        assert "cannot be reached" in err[-1] and time.monotonic() - t0 < 60, "no retries"


def test_hub_offline_mode_chosen_by_the_user_is_left_to_the_libraries(monkeypatch):
    models.hub_unreachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_unreachable() is False
    models.hub_unreachable.cache_clear()


def test_a_device_that_is_not_one_or_not_here_is_one_line_not_a_traceback():
    import torch

    with pytest.raises(ValueError, match="--device 'bogus' is not a device"):
        ptl_common.setup_dist("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
            ptl_common.setup_dist("cuda")


def test_gradual_stats_refuses_no_resamples_and_a_missing_results_directory(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gradual_stats

    with pytest.raises(ValueError, match="--reps 0 .need > 0."):
        gradual_stats.Config(reps=0)
    with pytest.raises(ValueError, match="is not a directory of gradual.py results"):
        gradual_stats.Config(results=str(tmp_path / "none"))


def test_a_released_top_n_too_large_for_the_model_is_refused_before_any_calibration_text_is_read(tiny_dirs, tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(ptl, "calibration_texts", lambda *a: pytest.fail("calibration texts were read"))
    with pytest.raises(ValueError, match="--released-top-n 40.0 leaves no neuron outside the bottom-n of a 40-wide"):
        ptl.main(ptl.Config(model=tiny_dirs["llama"], out=str(tmp_path / "o"), neuron_rule="released",
                            released_top_n="40", rounds=1, target_ratio=0.0))


@pytest.mark.parametrize("module, kw, message", [
    (recover, dict(data="missing.jsonl"), "--data missing.jsonl: no such file"),
    (grpo, dict(data="missing.parquet"), "--data missing.parquet: no such file"),
    (ptl, dict(calib_data="offline,missing.jsonl"), "--calib-data missing.jsonl: no such file"),
    (ptl, dict(recovery="cpt", cpt_flags="--data missing.txt --samples 4"), "--cpt-flags: --data missing.txt: no such"),
])
def test_a_missing_data_file_is_named_when_the_flags_are_read_not_after_calibration(module, kw, message, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        module.Config(**kw)


@pytest.mark.parametrize("module", [ptl, recover, grpo])
def test_an_out_that_cannot_be_a_directory_is_refused_when_the_flags_are_read(module, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ValueError, match=f"--out {out}: {tmp_path / 'file'} is a file"):
            module.Config(out=str(out))


@pytest.mark.parametrize("module", [ptl, recover, grpo])
def test_a_model_directory_spelled_with_a_trailing_slash_is_one_model(module, tiny_dirs):
    assert module.Config(model=tiny_dirs["llama"] + "/").model == tiny_dirs["llama"]
    assert module.Config(model="org/not-a-local-dir/").model == "org/not-a-local-dir/", "a hub name is kept as given"


def test_evaluate_refuses_to_time_models_of_different_tokenizers_before_evaluating(tiny_dirs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dirs["llama"], other)
    tok = models.load_model(tiny_dirs["llama"])[1]
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match=f"--compare {other}: its tokenizer differs"):
        ev.main(ev.Config(model=tiny_dirs["llama"], compare=str(other), tasks="offline", limit=1))


def test_a_limit_beyond_the_benchmark_and_new_tokens_beyond_the_positions_are_clamped_with_a_line(tiny_dirs, capsys,
                                                                                                   monkeypatch):
    monkeypatch.setattr(ev, "OFFLINE_MAX", 3)
    res = ev.main(ev.Config(model=tiny_dirs["llama"], tasks="offline", limit=10**9, max_new_tokens=10**6,
                            batch_size=3))
    out = capsys.readouterr().out
    positions = models.load_model(tiny_dirs["llama"])[0].config.max_position_embeddings
    assert res[tiny_dirs["llama"]]["offline"]["n"] == 3
    assert "--limit 1000000000: offline gives at most 3 questions; evaluating all of them" in out
    assert f"--max-new-tokens 1000000: the model has {positions} positions" in out


@pytest.mark.parametrize("argv, message", [
    (["scripts/bench_recover.py", "--steps", "0"], "bench_recover.py: error: out of range: --steps 0 (need > 0)"),
    (["scripts/bench_grpo.py", "--sides", "bogus"], "bench_grpo.py: error: --sides 'bogus': choose one or more of"),
    (["scripts/bench_eval.py", "--data-dir", "/nonexistent"], "bench_eval.py: error: /nonexistent/gsm8k/test.jsonl"),
    (["scripts/bench_ptl.py", "--repeats", "0"], "bench_ptl.py: error: out of range: --repeats 0 (need > 0)"),
    (["scripts/recipes.py", "bogus"], "recipes.py: error: unknown recipe 'bogus'; choose from table1-llama"),
    (["scripts/recipes.py", "--gpus", "0"], "recipes.py: error: out of range: --gpus 0 (need > 0)"),
])
def test_every_script_refuses_a_bad_value_in_one_line_before_it_runs_anything(argv, message):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr


def test_calibration_rows_for_every_round_are_checked_before_round_one(tiny_dirs, tmp_path):
    """--calib-per-round reads rows (t-1)n .. tn in round t: a file too short for the last round is refused at the
    start, not after the rounds it could feed."""
    data = tmp_path / "c.jsonl"
    data.write_text("".join(f'{{"text": "calibration text {i}"}}\n' for i in range(10)))
    with pytest.raises(ValueError, match="rows 16..20 were asked of .*which holds 10"):
        ptl.main(ptl.Config(model=tiny_dirs["llama"], out=str(tmp_path / "out"), calib_data=str(data),
                            calib_samples=4, calib_per_round=True, rounds=5, target_ratio=0.0, max_length=16))
    assert not (tmp_path / "out" / "round_1").exists()
