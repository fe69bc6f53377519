"""grpo.py is the spec: the GRPO equations as properties and goldens, rewards, masks, learning, resume, 2 ranks."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import grpo
from conftest import assert_trained_alike, char_tokenizer, tiny_model
from data import load_qa, question_answer

ROOT = Path(__file__).resolve().parents[1]
ROWS = load_qa("offline-easy", n=64, seed=0)


def sevens(text: str, answer: str) -> dict:
    """A reward a random tiny model can find: the share of its response that is the character 7."""
    return {"reward": text.count("7") / max(len(text), 1)}


def cfg(out, **kw) -> grpo.Config:
    return grpo.Config(**{"out": str(out), "rollout_batch": 4, "group_size": 8, "max_response_length": 8,
                          "max_steps": 3, "lr": 2e-2, "micro_batch": 16, "prompt": "fewshot",
                          "max_prompt_length": 512, **kw})


def run(out, *, reward_fn=sevens, model=None, **kw) -> dict:
    model = model or tiny_model("llama", layers=2)
    return grpo.train(model, char_tokenizer(), ROWS, cfg(out, **kw), reward_fn=reward_fn)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- equations

groups = st.integers(2, 8).flatmap(lambda g: st.tuples(st.just(g), st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=g, max_size=g), min_size=1, max_size=5)))


@settings(max_examples=200, deadline=None)
@given(groups, st.floats(-100, 100))
def test_advantages_are_centred_shift_invariant_and_zero_for_constant_groups(g_rows, c):
    g, rows = g_rows
    r = torch.tensor(rows, dtype=torch.float64).flatten()
    A = grpo.group_advantages(r, g).view(-1, g)
    assert torch.isfinite(A).all()
    assert torch.allclose(A.sum(1), torch.zeros(len(rows), dtype=A.dtype), atol=1e-6)
    torch.testing.assert_close(grpo.group_advantages(r + c, g), A.flatten(), atol=1e-4, rtol=1e-4)
    for row, a in zip(rows, A):
        if len(set(row)) == 1:
            assert (a == 0).all(), "a constant group carries no signal"


def test_advantage_golden_and_skipped_rewards():
    A = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5]), 3)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0): mean 1/3
    torch.testing.assert_close(A[:3], torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]), atol=1e-5, rtol=1e-5)
    assert A[3:].tolist() == [0.0, 0.0, 0.0]
    B = grpo.group_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4)  # the NaN (skipped) leaves the stats
    assert B[1] == 0 and torch.isfinite(B).all() and abs(B.sum()) < 1e-6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-30, 0), min_size=1, max_size=20), st.lists(st.floats(-30, 0), min_size=1, max_size=20))
@example([-5.960464477539063e-08], [0.0])  # found by hypothesis: exp(d) - d - 1 rounds to -6e-8 in fp32
def test_k3_is_nonnegative_and_zero_exactly_when_the_log_probs_agree(a, b):
    n = min(len(a), len(b))
    logp, ref = torch.tensor(a[:n]), torch.tensor(b[:n])
    kl = grpo.k3_kl(logp, ref)
    assert (kl >= 0).all()
    assert (kl[logp == ref] == 0).all() and (grpo.k3_kl(logp, logp) == 0).all()
    # k3 ~ d^2 / 2 for a small gap d, which fp32 rounds to 0 below |d| ~ 3e-4: above that it must be positive
    assert (kl[(logp - ref).abs() > 1e-3] > 0).all()


def test_with_ratio_one_and_no_kl_the_gradient_is_minus_advantage_times_grad_logp():
    model, tok = tiny_model("llama", layers=2), char_tokenizer()
    prompts = [tok("Question: 1 + 2?")["input_ids"], tok("Q")["input_ids"]]
    responses = [tok("3.", add_special_tokens=False)["input_ids"], tok("ab7", add_special_tokens=False)["input_ids"]]
    A = torch.tensor([0.7, -1.3])

    def grads(loss_fn):
        model.zero_grad()
        logp, mask = grpo.response_logps(model, prompts, responses, tok.pad_token_id, 1.0)
        (loss_fn(logp) * mask).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads(lambda lp: grpo.grpo_token_loss(lp, lp.detach(), lp.detach(), A, beta=0.0))
    reinforce = grads(lambda lp: -A[:, None] * lp)
    for a, b in zip(ours, reinforce):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def own_logps(model, prompts, responses, temperature):
    """The reference: each row alone, unpadded, all of prompt + response in one forward. -> list of (len(r),)"""
    out = []
    for p, r in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
        out.append(torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(r)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_log_probs_with_one_prefill_per_group_equal_each_rows_own_forward_and_so_do_gradients(arch):
    # groups of 3, 1 and 2 rows (the middle prompt one token long: no prefix to prefill), ragged responses, one
    # empty; qwen2's and gemma2's 4-token sliding windows make the prefilled cache drop tokens
    model, g = tiny_model(arch, layers=2), torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    p1, p2, p3 = tokens(9), tokens(1), tokens(5)
    prompts = [p1, p1, p1, p2, p3, p3]
    responses = [tokens(4), tokens(1), tokens(7), tokens(3), [], tokens(2)]
    w = torch.randn(len(prompts), 7, generator=g)  # any weighting of the tokens, for the gradients

    def run(fn):
        model.zero_grad()
        lps = fn()
        sum((lp * w[b, : len(lp)]).sum() for b, lp in enumerate(lps)).backward()
        return [lp.detach() for lp in lps], [q.grad.clone() for q in model.parameters()]

    def batched():
        logp, mask = grpo.response_logps(model, prompts, responses, 0, 0.7)
        assert mask.sum(1).tolist() == [len(r) for r in responses]
        return [logp[b, : len(r)] for b, r in enumerate(responses)]

    (got, got_grad), (want, want_grad) = run(batched), run(lambda: own_logps(model, prompts, responses, 0.7))
    for a, b in zip(got + got_grad, want + want_grad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ratio, A, clipped", [
    (1.5, 1.0, True),    # above 1 + eps_high with A > 0: no push further up
    (0.5, -1.0, True),   # below 1 - eps_low with A < 0: no push further down
    (1.1, 1.0, False), (0.9, -1.0, False),  # inside the trust region
    (0.5, 1.0, False),   # the unclipped side: a low ratio with A > 0 is still pulled up
    (5.0, -1.0, True),   # dual clip: for A < 0 the loss is capped at 3 |A|
])
def test_clipped_tokens_get_no_gradient_on_the_clipped_side(ratio, A, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = grpo.grpo_token_loss(logp, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([A]), beta=0.0)
    loss.sum().backward()
    assert (logp.grad.abs().item() == 0) == clipped


@pytest.mark.parametrize("A", [1.0, -1.0])
@pytest.mark.parametrize("log_ratio", [100.0, 88.8, -100.0])
def test_an_extreme_ratio_gives_a_finite_loss_and_a_finite_gradient(log_ratio, A):
    """exp(88.8) overflows fp32; unclamped, the clipped loss stays finite but its backward is inf * 0 = NaN."""
    logp = torch.tensor([[log_ratio, 0.1]], requires_grad=True)
    loss = grpo.grpo_token_loss(logp, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([A]))
    loss.sum().backward()
    assert loss.isfinite().all() and logp.grad.isfinite().all()
    assert logp.grad[0, 1] != 0, "an ordinary token of the same response still learns"


# ----------------------------------------------------------------------------- rewards and masks


@pytest.mark.parametrize("text, fmt", [
    ("<think>2 + 2 = 4</think> The answer is \\boxed{4}.", 1.0),
    ("< think >2 + 2 = 4</ think > so \\boxed{4}", 1.0),       # spaces around < > / are ignored
    ("2 + 2 = 4. The answer is \\boxed{4}.", 0.0),            # missing think
    ("<think>2 + 2 = 4</think> The answer is 4.", 0.0),       # missing box
    ("\\boxed{4} <think>then think</think>", 0.0),            # box before the thinking
])
def test_format_reward_goldens(text, fmt):
    assert grpo.format_reward(text) == fmt


@pytest.mark.parametrize("text, gold, acc", [
    ("<think></think>\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{2}{4}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),  # nested braces inside the box
    ("\\boxed{7}", "8", 0.0),                                       # wrong
    ("first \\boxed{8} then \\boxed{7}", "7", 1.0),                 # several boxes: the last counts
    ("first \\boxed{7} then \\boxed{8}", "7", 0.0),
    ("the answer is 7", "7", 0.0),                                  # no box
    ("\\boxed{1,000}", "1000", 1.0),
])
def test_accuracy_reward_goldens(text, gold, acc):
    assert grpo.accuracy_reward(text, gold) == acc


@pytest.mark.parametrize("boxed, gold, math_verify, mathruler", [
    ("\\frac{2}{4}", "\\frac{1}{2}", 1.0, 0.0),   # mathruler wants fractions reduced
    ("0.333333", "\\frac{1}{3}", 1.0, 0.0),       # and no decimal for a fraction
    ("2^{10}", "1024", 1.0, 0.0),                   # and an integer written as one
    ("\\pm 3", "3, -3", 1.0, 0.0),
    ("\\{1,2\\}", "\\{2,1\\}", 1.0, 0.0),         # sets: math-verify ignores the order
    ("1 / 2", "\\frac12", 1.0, 1.0),               # EasyR1 drops spaces around / before grading
    ("0.5", "\\frac{1}{2}", 1.0, 1.0),
    ("1,000", "1000", 1.0, 1.0),
    ("x^2+2x", "2x+x^2", 1.0, 1.0),
    ("41", "42", 0.0, 0.0),
])
def test_both_graders_against_their_goldens(boxed, gold, math_verify, mathruler):
    text = f"<think>work</think> so \\boxed{{{boxed}}}."
    assert grpo.accuracy_reward(text, gold) == math_verify
    assert grpo.accuracy_reward(text, gold, grader="mathruler") == mathruler


@pytest.mark.parametrize("text", ["<think> 2 </think> \\boxed{\\frac{2}{4}}", "<think>x</think>\\boxed{ 1 / 2 }",
                                  "\\boxed{0.5}", "no box, 1/2", "<think>y</think> \\fbox{1/2}"])
def test_the_mathruler_grader_is_easyr1s_reward_exactly(text):
    """EasyR1's examples/reward_function/math.py compute_score, written out: spaces around < > / dropped, then
    format and mathruler's grade of the last \\boxed{}; overall = 0.9 accuracy + 0.1 format."""
    import re

    from mathruler.grader import extract_boxed_content, grade_answer

    response = re.sub(r"\s*(<|>|/)\s*", r"\1", text)
    fmt = 1.0 if re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", response, re.DOTALL) else 0.0
    acc = 1.0 if grade_answer(extract_boxed_content(response), "\\frac{1}{2}") else 0.0
    ours = grpo.math_reward(text, "\\frac{1}{2}", grader="mathruler")
    assert ours == {"reward": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}


def test_rewards_read_boxed_only_and_evaluation_also_reads_fbox():
    assert grpo.accuracy_reward("<think>x</think> \\fbox{4}", "4") == 0.0, "EasyR1's format rule wants \\boxed"
    assert grpo.last_boxed("\\fbox{4}") == "4" and grpo.last_boxed("\\fbox{4}", fbox=False) is None


def test_a_reward_that_cannot_be_computed_is_skipped_not_zero(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    assert grpo.accuracy_reward("\\boxed{7}", "") is None, "nothing to compare with"
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: (_ for _ in ()).throw(TimeoutException("slow")))
    assert grpo.accuracy_reward("\\boxed{7.0}", "7") is None, "a timeout is not a wrong answer"
    r = grpo.math_reward("<think></think>\\boxed{7.0}", "7")
    assert math.isnan(r["reward"]) and r["format"] == 1.0
    assert grpo.last_boxed("\\boxed{\\frac{1}{2}") is None, "an unfinished box is no answer"


def test_completion_mask_keeps_the_first_eos_even_when_pad_is_eos():
    eos = pad = 2
    ids = torch.tensor([[5, 6, eos, pad, pad],   # EOS kept, padding (== EOS) after it masked
                        [5, eos, 7, 8, eos],     # tokens after the first EOS masked
                        [5, 6, 7, 8, 9]])        # truncated: every token kept
    assert grpo.completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert grpo.completion_mask(ids, [9, eos])[2].tolist() == [1, 1, 1, 1, 1], "several EOS ids"


@pytest.mark.parametrize("rec, qa", [
    ({"question": "q", "answer": "Natalia sold 48 ... \n#### 1,072"}, ("q", "1072")),   # GSM8K
    ({"problem": "p", "answer": "\\frac{1}{2}"}, ("p", "\\frac{1}{2}")),                 # math12k, MATH-500
    ({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."}, ("p", "\\frac{1}{2}")),  # MATH solution only
])
def test_questions_and_gold_answers_from_each_data_format(rec, qa):
    assert question_answer(rec, "x") == qa


def test_data_without_a_gold_answer_names_the_file_and_line(tmp_path, tiny_dirs):
    (tmp_path / "d.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: record has fields \['problem'\]"):
        grpo.main(cfg(tmp_path / "out", model=tiny_dirs["llama"], data=str(tmp_path / "d.jsonl"), samples=2))


def test_the_chat_prompt_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        grpo.render(char_tokenizer(), "1 + 1?", "chat")


# ----------------------------------------------------------------------------- the loop


def test_mean_reward_rises_on_a_reward_the_model_can_find(tmp_path):
    run(tmp_path, max_steps=16)
    rewards = [r["reward"] for r in metrics(tmp_path)]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards


def test_skipped_rewards_are_counted_and_left_out(tmp_path):
    half = lambda text, answer: {"reward": float("nan") if "7" in answer else 1.0 * ("1" in text)}  # noqa: E731
    run(tmp_path, reward_fn=half, max_steps=2)
    assert sum(r["skipped"] for r in metrics(tmp_path)) > 0


def test_a_killed_run_resumes_and_ends_equal_to_an_unbroken_one(tmp_path, monkeypatch):
    real, calls = grpo.train_step, []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # step 3, after the checkpoint of step 2
        return real(*a, **k)

    monkeypatch.setattr(grpo, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", max_steps=4, save_every=2)
    monkeypatch.setattr(grpo, "train_step", real)
    assert run(tmp_path / "resumed", max_steps=4, save_every=2)["resumed_at"] == 2
    run(tmp_path / "straight", max_steps=4, save_every=2)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("resumed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731  timings
    assert keep(metrics(tmp_path / "resumed")) == keep(metrics(tmp_path / "straight"))


def test_a_nan_loss_stops_the_run_and_the_last_checkpoint_still_loads(tmp_path, monkeypatch):
    real, calls = grpo.grpo_token_loss, []

    def nan_later(*a, **k):  # 2 micro-batches per step: calls 5 and 6 are step 3, after the step-2 checkpoint
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) > 4 else out

    monkeypatch.setattr(grpo, "grpo_token_loss", nan_later)
    with pytest.raises(FloatingPointError, match="GRPO loss is nan"):
        run(tmp_path, max_steps=4, save_every=2)
    state = torch.load(tmp_path / "checkpoints" / "step_2" / "state.pt", weights_only=False)
    model = tiny_model("llama", layers=2)
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_ranks_make_the_same_update_as_one(tmp_path, tiny_dirs):
    worker = [str(ROOT / "tests" / "grpo_worker.py"), tiny_dirs["llama"]]
    subprocess.run([sys.executable, *worker, str(tmp_path / "one")], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
                    str(tmp_path / "two")], cwd=ROOT, check=True)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert_trained_alike(a, b, lr=1e-2, steps=2)
    rewards = [[r["reward"] for r in metrics(tmp_path / d)] for d in ("one", "two")]
    assert rewards[0] == pytest.approx(rewards[1])
    assert metrics(tmp_path / "one")[0]["reward"] > 0, "the update had something to learn from"
