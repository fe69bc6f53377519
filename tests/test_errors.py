"""Bad input gets one clear line (`script.py: error: ...`, exit status 2; the traceback only with --debug), before
any model loads, and nothing runs on silently."""
import subprocess
import sys
from pathlib import Path

import pytest

import grpo
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

    monkeypatch.setattr(ptl_common, "hub_unreachable", lambda: True)
    for argv, hint in ((["--model", "someorg/not-a-model"], "use --model smollm2-135m"),
                       (["--model", tiny_dirs["llama"], "--calib-data", "someorg/not-a-dataset"], "use `offline`")):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            ptl_common.run_cli(ptl.main, ptl.Config, [*argv, "--rounds", "1", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and ": error: " in err[-1] and hint in err[-1], err
        assert "cannot be reached" in err[-1] and time.monotonic() - t0 < 60, "no retries"


def test_hub_offline_mode_chosen_by_the_user_is_left_to_the_libraries(monkeypatch):
    ptl_common.hub_unreachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ptl_common.hub_unreachable() is False
    ptl_common.hub_unreachable.cache_clear()
