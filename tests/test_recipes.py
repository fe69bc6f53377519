"""scripts/recipes.py: every paper recipe parses (its flags and the flags it hands to each recovery and
evaluation step), and offline each one stops at the first hub download with a message that says so."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import grpo
import ptl
import ptl_common
import recover

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import recipes  # noqa: E402

MODULES = {"ptl": ptl, "recover": recover, "grpo": grpo, "evaluate": ptl_common.import_evaluate()}


def filled(args: str) -> list[str]:
    return shlex.split(re.sub(r"\{(last|rounds):[^}]+\}", lambda m: "out/x/round_3" if m[1] == "last" else "3", args))


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_step_parses_and_so_do_the_flags_it_passes_on(name):
    for step in recipes.RECIPES[name].steps:
        module, args = step.split(" ", 1)
        cfg = ptl_common.parse_config(MODULES[module].Config, filled(args))
        if module == "ptl":
            for kind, mod in (("cpt", recover), ("grpo", grpo)):
                if kind in cfg.recovery.split("+"):
                    assert ptl_common.parse_config(mod.Config, filled(getattr(cfg, f"{kind}_flags"))).samples > 0
            if cfg.eval_every_round:
                ptl_common.parse_config(MODULES["evaluate"].Config, shlex.split(cfg.eval_flags)).task_list()


def test_every_recipe_stops_offline_at_the_model_download_with_a_clear_message(tmp_path):
    code = """
import sys
sys.path[:0] = [{root!r}, {scripts!r}]
import recipes, ptl, ptl_common, grpo
mods = {{"ptl": ptl, "grpo": grpo, "evaluate": ptl_common.import_evaluate()}}
for name, r in recipes.RECIPES.items():
    module, args = r.steps[0].split(" ", 1)
    try:
        m = mods[module]
        m.main(ptl_common.parse_config(m.Config, recipes.resolve(args) + ["--out", {out!r} + name]))
    except FileNotFoundError as e:
        print(name, "STOPPED", "Could not load model" in str(e) and "Offline, use --model smollm2-135m" in str(e))
"""
    code = code.format(root=str(ROOT), scripts=str(ROOT / "scripts"), out=f"{tmp_path}/")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert sorted(out.stdout.split()[::3]) == sorted(recipes.RECIPES), out.stderr[-2000:]
    assert out.stdout.count("STOPPED True") == len(recipes.RECIPES), out.stdout
