"""grpo.py against TRL's GRPOTrainer on the same model, the same prompts in the same order, group size,
response length, sampling, lr, KL coefficient, clip range, loss aggregation and reward function: seconds per
step split into generation and the rest (scoring, log-probs, update), and the reward of every step.

Each side runs in its own subprocess, alternated A B C A B C, so ratios are measured side by side on a noisy
machine. Sides: `ours` is grpo.py as shipped (rollouts on fast.decode: each prompt prefilled once for its
G responses, finished responses leave the batch); `ours-hf` is grpo.py with --rollout-engine hf (one generate call
for all of a step's prompts, as TRL makes).
TRL is not a dependency of ptl: `pip install trl` to run this.

    python scripts/bench_grpo.py                              # SmolLM2-135M, CPU, offline-easy prompts
    python scripts/bench_grpo.py --steps 6 --repeats 3
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from sides import check_sides, emit, run_sides  # noqa: E402

from models import DEFAULT_MODEL  # noqa: E402
from ptl_common import check_ranges, run_cli  # noqa: E402


@dataclass
class Config:
    """Benchmark grpo.py against trl.GRPOTrainer (seconds per step, generation share, reward)."""
    model: str = DEFAULT_MODEL
    prompts: int = 4  # per step
    group_size: int = 8
    max_response_length: int = 64
    micro_batch: int = 16  # responses per forward/backward
    steps: int = 4
    lr: float = 1e-6
    kl_coef: float = 1e-2
    seed: int = 0
    repeats: int = 2
    sides: str = "ours,ours-hf,trl"
    worker: str = ""  # internal: runs one side and prints JSON

    def __post_init__(self):
        check_ranges(self, positive=("prompts", "group_size", "max_response_length", "micro_batch", "steps", "lr",
                                     "repeats"), non_negative=("kl_coef", "seed"))
        check_sides(self.sides, ("ours", "ours-hf", "trl"))


def setup(cfg: Config):
    """Model, tokenizer and the (question, answer) rows, in the order grpo.py visits them in epoch 0."""
    from data import load_qa
    from models import load_model

    model, tok = load_model(cfg.model, dtype="float32", device="cpu")
    n = cfg.prompts * cfg.steps
    rows = load_qa("offline-easy", n=n, seed=cfg.seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()  # grpo.train's epoch 0
    return model, tok, rows, order


class Timer:
    """TRL's timings: wraps model.generate (TRL calls it on the unwrapped model) and stamps step ends."""

    def __init__(self, model):
        self.gen, self.marks, self.t0 = 0.0, [], time.perf_counter()
        real = model.generate

        def generate(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.gen += time.perf_counter() - t
        model.generate = generate

    def step_end(self):
        self.marks.append((time.perf_counter(), self.gen))

    def split(self) -> dict:
        (t, g), steps, gens = (self.t0, 0.0), [], []
        for t1, g1 in self.marks:
            steps.append(t1 - t)
            gens.append(g1 - g)
            t, g = t1, g1
        return {"step_s": steps, "gen_s": gens}


def run_ours(cfg: Config, engine: str) -> dict:
    """Our GRPO for cfg.steps steps; its timings come from its own metrics.jsonl (step_s, gen_s per step)."""
    import grpo

    model, tok, rows, _ = setup(cfg)
    with tempfile.TemporaryDirectory() as out:
        gc = grpo.Config(out=out, rollout_batch=cfg.prompts, group_size=cfg.group_size, prompt="fewshot",
                         max_response_length=cfg.max_response_length, micro_batch=cfg.micro_batch,
                         rollout_engine=engine, max_steps=cfg.steps, lr=cfg.lr, kl_coef=cfg.kl_coef, seed=cfg.seed,
                         device="cpu")
        grpo.train(model, tok, rows, gc)
        logs = [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {key: [r[key] for r in logs] for key in ("step_s", "gen_s", "reward", "response_len")}


def run_trl(cfg: Config) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import grpo

    model, tok, rows, order = setup(cfg)
    ds = datasets.Dataset.from_dict({"prompt": [grpo.render(tok, rows[i][0], "fewshot") for i in order],
                                     "answer": [rows[i][1] for i in order]})

    def reward(completions, answer, **_):  # the same 0.9 * accuracy + 0.1 * format
        return [grpo.math_reward(c, a)["reward"] for c, a in zip(completions, answer)]
    timer, logs = Timer(model), []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            timer.step_end()

        def on_log(self, args, state, control, logs_=None, **k):
            if (k.get("logs") or logs_ or {}).get("reward") is not None:
                logs.append(k.get("logs") or logs_)

    per_step = cfg.prompts * cfg.group_size
    with tempfile.TemporaryDirectory() as out:
        # loss_type "dapo": sum of token losses / tokens in the whole batch, grpo.py's (and verl's) token mean.
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=cfg.micro_batch,
            gradient_accumulation_steps=per_step // cfg.micro_batch, num_generations=cfg.group_size,
            max_completion_length=cfg.max_response_length, temperature=1.0, top_p=0.99, top_k=0, beta=cfg.kl_coef,
            epsilon=0.2, epsilon_high=0.3, loss_type="dapo", scale_rewards="group", learning_rate=cfg.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=1e-2, max_grad_norm=1.0, max_steps=cfg.steps,
            logging_steps=1, save_strategy="no", report_to=[], shuffle_dataset=False, seed=cfg.seed,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[Clock()])
        timer.t0 = time.perf_counter()
        trainer.train()
    return {**timer.split(), "reward": [r["reward"] for r in logs],
            "response_len": [r.get("completions/mean_length", float("nan")) for r in logs]}


def main(cfg: Config) -> dict:
    if cfg.worker:
        engine = "hf" if cfg.worker == "ours-hf" else "builtin"
        return emit(run_trl(cfg) if cfg.worker == "trl" else run_ours(cfg, engine))
    runs = run_sides(__file__, cfg, cfg.sides.split(","))
    print(f"model {cfg.model} | {cfg.steps} steps of {cfg.prompts} prompts x {cfg.group_size} responses, up to "
          f"{cfg.max_response_length} tokens | {cfg.repeats} runs each, alternated | first step skipped in times")
    res = {}
    for side, rs in runs.items():  # the first step holds one-off costs (reference copy, allocation): skip it
        step = statistics.median(s for r in rs for s in r["step_s"][1:])
        gen = statistics.median(s for r in rs for s in r["gen_s"][1:])
        reward = [statistics.mean(r["reward"][i] for r in rs) for i in range(cfg.steps)]
        length = statistics.mean(x for r in rs for x in r["response_len"])
        res[side] = {"step_s": step, "gen_s": gen, "rest_s": step - gen, "reward": reward, "response_len": length}
        print(f"  {side:13s} s/step {step:6.2f} | generate {gen:6.2f} | rest {step - gen:6.2f} | mean response "
              f"{length:5.1f} tokens | reward per step " + " ".join(f"{x:.3f}" for x in reward))
    if "trl" in res:
        t = res["trl"]
        for side in (s for s in res if s != "trl"):
            o = res[side]
            print(f"{side} vs TRL: {t['step_s'] / o['step_s']:.2f}x faster per step (generate "
                  f"{t['gen_s'] / o['gen_s']:.2f}x, rest {t['rest_s'] / o['rest_s']:.2f}x); mean reward "
                  f"{statistics.mean(o['reward']):.3f} vs {statistics.mean(t['reward']):.3f}")
    return res


if __name__ == "__main__":
    run_cli(main, Config)
