"""One GRPO update on a tiny checkpoint with a reward a random model can earn; run as `python` or `torchrun`
by tests/test_grpo.py to check that 2 ranks make the same update as 1."""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from test_grpo import sevens  # noqa: E402

import grpo  # noqa: E402
from data import load_qa  # noqa: E402
from models import load_model  # noqa: E402
from ptl_common import cleanup_dist, setup_dist  # noqa: E402

if __name__ == "__main__":
    model_dir, out = sys.argv[1:3]
    d = setup_dist("cpu")
    model, tok = load_model(model_dir, dtype="float32")
    rows = load_qa("offline-easy", n=16, seed=0)
    cfg = grpo.Config(out=out, rollout_batch=4, group_size=4, max_response_length=6, max_steps=2, lr=1e-2,
                      micro_batch=3, gen_batch=1, prompt="fewshot", max_prompt_length=512, kl_coef=0.05)
    grpo.train(model, tok, rows, cfg, reward_fn=sevens)
    cleanup_dist()
