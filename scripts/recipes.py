"""One command per paper result: the paper's models, data and hyperparameters (the authors' released values
noted where they differ), run as a sequence of ptl.py / recover.py / grpo.py / evaluate.py steps.

    python scripts/recipes.py --list
    python scripts/recipes.py table1-llama --print          # the commands, without running them
    python scripts/recipes.py table1-llama --gpus 8         # run them (needs the hub and the hardware)

They need a GPU cluster and network; offline each stops at the first hub download with a clear message
(tests/test_recipes.py). A miniature of Table 1 that runs on two CPU cores: scripts/gradual.py (PTL against
Prune-Once, SliceGPT, the LLM-Pruner criterion and ShortGPT, powered and paired).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptl_common import check_ranges, finished_rounds, flag, run_cli  # noqa: E402

MATH = "AI-MO/NuminaMath-CoT,meta-math/MetaMathQA"
# Paper: lr 8e-6, 1024 tokens; the released Llama/Qwen yamls: lr 4e-6, 512 tokens. 100k texts per round = the
# authors' 100k-line chunks, one per round.
CPT = (f"--data {MATH} --samples 100000 --max-length 1024 --lr 8e-6 --global-batch 32 --micro-batch 2 --fsdp "
       "--grad-ckpt --save-every 200")
GRPO = "--data hiyouga/math12k --samples 1200 --max-response-length 3000 --epochs 15 --prompt chat"
EVAL = "--tasks gsm8k,minerva_math,math500 --engine lm-eval --batch-size 32"
CALIB = f"--calib-data {MATH} --calib-samples 512 --max-length 1024"
# Neuron steps of 1000 per round, as the released code: 1000/14336 (Llama-3-8B, Gemma-2-9B), 1000/18944 (Qwen2.5-7B).
LLAMA = "--model meta-llama/Meta-Llama-3-8B --target-ratio 0.375 --layer-target 2 --neuron-step 0.0698"
GEMMA = "--model google/gemma-2-9b --target-ratio 0.37 --layer-target 1 --neuron-step 0.0698"
QWEN = "--model Qwen/Qwen2.5-7B --target-ratio 0.3 --neuron-step 0.0528"
# Table 4: OpenCoder's opc-sft-stage2 and StarCoder's python subset probe the code neurons and are the corpus;
# the general-text corpus of the math runs guards language neurons (Section 4.2). StarCoder is gated: accept
# its terms on the hub first.
CODE = ",".join([*(f"OpenCoder-LLM/opc-sft-stage2:{c}" for c in ("educational_instruct", "evol_instruct",
                                                                "mceval_instruct", "package_instruct")),
                 "bigcode/starcoderdata:data_dir=python"])
MBPP = "--tasks mbpp --batch-size 32 --max-new-tokens 512"
# The authors' released loop (scripts/run_iter.sh): 10 rounds of 1000 neurons on the SimpleRL-Zoo Qwen, each
# scored on 10 fresh math texts and 10 fresh English lines with n = 16000, 15000, ..., then GRPO on a tenth of
# math12k; their R1-style evaluation (zero-shot, 3000 tokens).
RELEASED = ("--model hkust-nlp/Qwen-2.5-Math-7B-SimpleRL-Zoo --target-ratio 0 --rounds 10 --neuron-step 0.052787 "
            "--neuron-rule released --released-top-n " + ",".join(str(16000 - 1000 * i) for i in range(10)) +
            f" --calib-data {MATH} --calib-samples 10 --calib-per-round --protect-data data/general_en.txt "
            "--protect-samples 10 --max-length 1024")
# EasyR1's upstream examples/config.yaml (GRPO on all of math12k from Qwen2.5-7B-Instruct), for comparing grpo.py with
# EasyR1's own published runs: n 5, 512-prompt rollouts in 4 updates, top_p 1.0, 2048 tokens, mathruler's grader.
EASYR1 = ("--model Qwen/Qwen2.5-7B-Instruct --data hiyouga/math12k --samples 0 --prompt chat --group-size 5 "
          "--rollout-batch 512 --mini-batches 4 --top-p 1.0 --max-response-length 2048 --epochs 15 --grader mathruler")


@dataclass
class Recipe:
    hardware: str
    paper: str  # the numbers it should land near
    steps: list[str] = field(default_factory=list)  # "module flags"; {last:DIR} = DIR's last finished round,
    # {rounds:DIR*N} = N x the rounds DIR holds (Prune-Once's recovery budget = PTL's over all its rounds)


# SliceGPT's own calibration (Ashkboos et al., 2024: 1024 sequences of 2048 tokens), on Table 1's math data
SLICE_CALIB = f"--calib-data {MATH} --calib-samples 1024 --max-length 2048 --batch-size 4"


def depth_only(base: str) -> str:
    """A model's flags without the neuron step and layer count, which ShortGPT and SliceGPT do not take."""
    return re.sub(r" --(neuron-step|layer-target) \S+", "", base)


def table1(base: str, out: str, recovery: str, paper: str, hardware: str, slicegpt: bool = True) -> Recipe:
    """PTL, Prune-Once, ShortGPT and SliceGPT (not for Gemma2, whose post-norms it cannot fold) at the same target and
    the same recovery, then Table 1's metrics."""
    rec = f'--recovery {recovery} --{recovery}-flags "{CPT if recovery == "cpt" else GRPO}"'
    # Prune-Once and ShortGPT recover once, with all the data PTL used over its rounds
    once = rec.replace("--samples 100000", f"--samples {{rounds:{out}/ptl*100000}}").replace(
        "--samples 1200", f"--samples {{rounds:{out}/ptl*1200}}")
    return Recipe(hardware, paper, [
        f"ptl {base} {CALIB} {rec} --eval-every-round --eval-flags \"{EVAL} --limit 200\" --out {out}/ptl",
        f"ptl {base} {CALIB} --baseline prune-once {once} --out {out}/prune_once",
        f"ptl {depth_only(base)} {CALIB} --baseline shortgpt {once} --out {out}/shortgpt",
        *([f"ptl {depth_only(base)} {SLICE_CALIB} --baseline slicegpt {once} --out {out}/slicegpt"] * slicegpt),
        # one process: the dense model and every compressed one, accuracy each, speed timed alternately against dense
        f"evaluate --model {base.split()[1]} --compare " + ",".join(
            f"{{last:{out}/{m}}}" for m in ["ptl", "prune_once", "shortgpt"] + ["slicegpt"] * slicegpt)
        + f" {EVAL} --out {out}/eval.json",
        f"evaluate --report {out}/ptl"])


RECIPES = {
    "table1-llama": table1(LLAMA, "out/llama3", "cpt", "PTL-Llama3-5B (CPT): GSM8K 52.5, Minerva 18.5, MATH-500 16.1; "
                           "6.3T FLOPs, 2.6x speedup (dense 54.7 / 16.0 / 14.6)", "8x A100-80GB"),
    "table1-gemma": table1(GEMMA, "out/gemma2", "cpt", "PTL-Gemma2-5B (CPT): GSM8K 70.6, Minerva 26.4, MATH-500 26.2; "
                           "6.1T FLOPs, 1.3x (dense 70.0 / 29.1 / 26.9)", "8x A100-80GB", slicegpt=False),
    "table1-qwen-rl": table1(QWEN, "out/qwen", "grpo", "PTL-Qwen2.5-5B (RL): GSM8K 84.9, Minerva 24.1, MATH-500 61.2; "
                             "4.9T FLOPs, 1.2x (dense 85.7 / 26.1 / 61.0)", "8x A100-80GB"),
    "table2": Recipe("8x A100-80GB", "PTL-Qwen2.5 CT + RL: GSM8K 86.9, Minerva 34.2 (dense 85.7 / 26.1)", [
        f"ptl {QWEN} {CALIB} --recovery cpt+grpo --cpt-flags \"{CPT}\" --grpo-flags \"{GRPO}\" --out out/table2",
        f"evaluate --model {{last:out/table2}} {EVAL} --out out/table2_eval.json"]),
    "table3": Recipe("8x A100-80GB", "Gemma2, order: Neu-Lay best (70.6 / 26.4 / 26.2); others within 6 points", [
        *(f"ptl {GEMMA} {CALIB} --order {o} --recovery cpt --cpt-flags \"{CPT}\" --out out/table3_{o}"
          for o in ("neu-lay", "lay-neu", "alternate")),
        *(f"evaluate --model {{last:out/table3_{o}}} {EVAL} --out out/table3_{o}.json"
          for o in ("neu-lay", "lay-neu", "alternate"))]),
    "figure4": Recipe("8x A100-80GB", "step 5% > 10% > 20%: average accuracy +9 and +14 points", [
        *(f"ptl {GEMMA.replace('--neuron-step 0.0698', f'--neuron-step {s}')} {CALIB} --recovery cpt "
          f"--cpt-flags \"{CPT}\" --out out/figure4_{s}" for s in ("0.05", "0.1", "0.2")),
        *(f"evaluate --model {{last:out/figure4_{s}}} {EVAL} --out out/figure4_{s}.json"
          for s in ("0.05", "0.1", "0.2"))]),
    "table4": Recipe("8x A100-80GB", "MBPP 3-shot: PTL-Llama3-5B 45.0, 1.9T FLOPs, 2.6x, 12 h recovery; ShortGPT 11.7, "
                     "2.0T, 2.1x, 14 h (dense 50.0, 2.8T)", [
        f"ptl {LLAMA} --calib-data {CODE} --calib-samples 512 --max-length 1024 --recovery cpt --cpt-flags "
        f"\"{CPT.replace(MATH, CODE)}\" --out out/table4/ptl",
        f"ptl {depth_only(LLAMA)} --calib-data {CODE} --calib-samples 512 --max-length 1024 --baseline shortgpt "
        f"--recovery cpt --cpt-flags "
        f"\"{CPT.replace(MATH, CODE).replace('--samples 100000', '--samples {rounds:out/table4/ptl*100000}')}\" "
        "--out out/table4/shortgpt",
        f"evaluate --model meta-llama/Meta-Llama-3-8B --compare {{last:out/table4/ptl}},{{last:out/table4/shortgpt}} "
        f"{MBPP} --out out/table4/eval.json"]),
    # Table 5 evaluates the math-recovered models of Table 1 (run table1-llama and table1-gemma first) on SQuAD v1.1
    # validation, zero-shot (lm-eval squadv2's prompt), EM / F1 by the official normalisation
    "table5": Recipe("1x A100-80GB", "SQuAD EM / F1: Gemma2-9B 27.4 / 34.8 -> PTL 28.2 / 32.9; Llama3-8B 27.3 / "
                     "33.6 -> PTL 37.2 / 40.6 (the paper's table is garbled; read as EM / F1 pairs)", [
        *(f"evaluate --model {m} --tasks squad --batch-size 32 --max-new-tokens 32 --out out/table5/{n}_dense.json"
          for n, m in (("llama3", "meta-llama/Meta-Llama-3-8B"), ("gemma2", "google/gemma-2-9b"))),
        *(f"evaluate --model {{last:out/{n}/ptl}} --tasks squad --batch-size 32 --max-new-tokens 32 "
          f"--out out/table5/{n}_ptl.json" for n in ("llama3", "gemma2"))]),
    "released": Recipe("8x H200-141GB", "the authors' released loop (run_iter.sh): not a paper table; PTL-Qwen2.5 RL "
                       "(Table 1) reports GSM8K 84.9, Minerva 24.1, MATH-500 61.2", [
        f"ptl {RELEASED} --recovery grpo --grpo-flags \"{GRPO}\" --out out/released",
        "evaluate --model {last:out/released} --tasks gsm8k,math500 --prompt chat "
        "--max-new-tokens 3000 --out out/released_eval.json"]),
    "easyr1-upstream": Recipe("8x H200-141GB", "EasyR1's own example run (not a paper result): grpo.py with EasyR1's "
                              "upstream config, to compare reward curves", [f"grpo {EASYR1} --out out/easyr1"]),
    "table6": Recipe("8x A100-80GB", "Gemma2 per round: 9.2B -> 5.8B over 8 rounds, GSM8K / MATH per round", [
        f"ptl {GEMMA} {CALIB} --recovery cpt --cpt-flags \"{CPT}\" --eval-every-round --eval-flags \"{EVAL}\" "
        "--out out/table6",
        "evaluate --report out/table6"]),
}


def resolve(step: str) -> list[str]:
    """argv of a step, with {last:DIR} and {rounds:DIR} filled in from finished runs."""
    def fill(m):
        kind, d, times = m.group(1), m.group(2), int(m.group(3) or 1)
        done = finished_rounds(d)
        if not done:
            raise FileNotFoundError(f"{d} holds no finished round yet: run the earlier steps first")
        return f"{d}/round_{done[-1]}" if kind == "last" else str(len(done) * times)
    return shlex.split(re.sub(r"\{(last|rounds):([^}*]+)(?:\*(\d+))?\}", fill, step))


@dataclass
class Config:
    """Run (or print) one paper result's commands."""
    recipe: str = flag("", "the recipe to run (or print); --list shows them")
    list: bool = flag(False, "list the recipes, their hardware and the paper's numbers")
    print: bool = flag(False, "print the commands instead of running them")
    gpus: int = flag(8, "processes per torchrun")

    def __post_init__(self):
        check_ranges(self, positive=("gpus",))
        if self.recipe and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)} (--list shows them)")


def main(cfg: Config) -> dict:
    if cfg.list or not cfg.recipe:
        for name, r in RECIPES.items():
            print(f"{name:15s} {r.hardware:14s} {r.paper}")
        return {}
    r = RECIPES[cfg.recipe]
    for step in r.steps:
        module, args = step.split(" ", 1)
        launcher = ["torchrun", "--nproc_per_node", str(cfg.gpus)] if module != "evaluate" else [sys.executable]
        if cfg.print:
            print(" ".join(launcher), f"{module}.py", args)
            continue
        subprocess.run([*launcher, str(ROOT / f"{module}.py"), *resolve(args)], check=True, cwd=ROOT)
    return {"recipe": cfg.recipe, "steps": len(r.steps)}


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--recipe", *argv]
    run_cli(main, Config, argv)
