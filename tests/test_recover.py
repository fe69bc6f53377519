"""recover.py is the spec: packing, the schedule, the loss, accumulation, resume, NaN, bad data, 2 ranks."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import fast
import recover
import trainer
from conftest import assert_trained_alike, char_tokenizer, tiny_model
from data import load_texts

ROOT = Path(__file__).resolve().parents[1]
TEXTS = load_texts("offline", n=24, seed=0)


def cfg(out, **kw) -> recover.Config:
    return recover.Config(**{"out": str(out), "max_length": 32, "global_batch": 4, "micro_batch": 2, "lr": 3e-3,
                             "max_steps": 4, "warmup_ratio": 0.25, **kw})


def run(out, *, model=None, texts=TEXTS, **kw) -> dict:
    return recover.train(model or tiny_model("llama", layers=2), char_tokenizer(), texts, cfg(out, **kw))


def weights(out) -> dict:
    return load_file(Path(out) / "model.safetensors")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_packing_keeps_every_token_once_in_order_eos_between_documents_and_no_label_on_padding():
    eos = pad = 2  # pad == eos, as in SmolLM2: EOS separators must still be learned
    docs = [[5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13, eos]]
    p = recover.pack(docs, block=5, pad_id=pad)
    ids, labels, mask = p["input_ids"], p["labels"], p["attention_mask"]
    assert ids.tolist() == [[5, 6, 7, eos, 8], [eos, 9, 10, 11, 12], [13, eos, pad, pad, pad]]
    assert ids[mask.bool()].tolist() == [t for d in docs for t in d], "every token once, in order"
    assert labels.tolist() == [[5, 6, 7, eos, 8], [eos, 9, 10, 11, 12], [13, eos, -100, -100, -100]]


@pytest.mark.parametrize("n, g", [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_every_block_is_trained_on_once_per_epoch_and_every_step_has_a_full_batch(n, g):
    steps = math.ceil(n / g)
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            idx, live = recover.step_blocks(step, n, g, seed=3)
            assert len(idx) == len(live) == g and live[: int(live.sum())].all(), "fillers come last"
            seen += idx[live].tolist()
        assert sorted(seen) == list(range(n))


def test_a_partial_last_batch_is_trained_on_with_label_free_fillers(tmp_path):
    """10 texts pack into a number of blocks that 4 does not divide: the last step still counts every token, and
    recovery token counts do not depend on how texts are split between runs (PTL's rounds vs one run)."""
    tok = char_tokenizer()
    whole = run(tmp_path / "whole", texts=TEXTS[:10], max_steps=0)
    parts = [run(tmp_path / f"part{i}", texts=TEXTS[5 * i : 5 * i + 5], max_steps=0) for i in range(2)]
    blocks = recover.pack([ids + [tok.eos_token_id] for ids in tok(TEXTS[:10])["input_ids"]], 32, tok.pad_token_id)
    assert len(blocks["input_ids"]) % 4 and whole["steps"] == math.ceil(len(blocks["input_ids"]) / 4)
    real = int(blocks["attention_mask"].sum())
    assert whole["tokens"] == real == sum(p["tokens"] for p in parts), "every token once, however the texts split"
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "whole"))


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    lrs = [recover.cosine_lr(s, total=10, warmup=2, peak=1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0
    assert lrs[2:] == sorted(lrs[2:], reverse=True)
    assert math.isclose(recover.cosine_lr(6, 10, 2, 1.0), 0.5)  # half way through the decay
    assert recover.cosine_lr(10, 10, 2, 1.0) == 0.0


def test_token_loss_sum_is_the_mean_cross_entropy_times_the_label_count():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    total, n = trainer.token_loss_sum(logits, labels)
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == 6 and torch.allclose(total / n, mean)


def _plain_loss(h, W, y, cap):
    z = h @ W.t()
    z = cap * torch.tanh(z / cap) if cap else z
    return F.cross_entropy(z.float(), y, ignore_index=-100, reduction="sum")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 45), st.sampled_from([None, 3.0]), st.integers(0, 2**31))
def test_chunked_lm_head_cross_entropy_equals_the_plain_one_and_its_gradients(n, chunk, cap, seed):
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(n, 8, generator=g, requires_grad=True), torch.randn(13, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 13, (n,), generator=g).masked_fill(torch.rand(n, generator=g) < 0.3, -100)
    plain = _plain_loss(h, W, y, cap)
    ref = torch.autograd.grad(plain, (h, W))
    chunked = fast.ChunkedLinearCE.apply(h, W, y, chunk, cap)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(3 * chunked, (h, W)), ref):  # backward scales by the incoming gradient
        torch.testing.assert_close(a, 3 * b, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_the_chunked_head_matches_the_plain_one_to_bf16_precision():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(30, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (30,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _plain_loss(h, W, y, None)
        ref = torch.autograd.grad(plain, (h, W))
        chunked = fast.ChunkedLinearCE.apply(h, W, y, 7, None)
        got = torch.autograd.grad(chunked, (h, W))
    assert chunked.dtype == torch.float32 and got[1].dtype == W.dtype
    torch.testing.assert_close(chunked, plain.float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("gemma2", True)])  # gemma2: soft-cap
def test_training_with_the_chunked_head_equals_training_with_the_plain_one(arch, tied, tmp_path):
    runs = {c: run(tmp_path / str(c), model=tiny_model(arch, layers=2, tied=tied), ce_chunk=c)["model"]
            for c in (0, 5)}
    for (k, a), b in zip(runs[0].state_dict().items(), runs[5].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    losses = [[r["loss"] for r in metrics(tmp_path / str(c))] for c in (0, 5)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    head = runs[5].get_output_embeddings()
    assert "forward" not in vars(head) and runs[5].config.to_dict().get("final_logit_softcapping") == (
        30.0 if arch == "gemma2" else None), "the head and the soft-cap are handed back as they were"


def test_loss_goes_down_on_repeated_data(tmp_path):
    run(tmp_path, texts=TEXTS[:3] * 8, max_steps=12, lr=1e-2, warmup_ratio=0.1)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0], losses  # steps see different blocks: compare a mean


def test_micro_2_times_accumulation_2_equals_micro_4_in_one_step(tmp_path):
    run(tmp_path / "a", micro_batch=2)  # global 4 = 2 micro x 2 accumulation
    run(tmp_path / "b", micro_batch=4)  # global 4 = 4 micro x 1
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    losses = [[r["loss"] for r in metrics(tmp_path / d)] for d in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    def counted(calls):  # layer 0 runs twice per micro-step when backward recomputes it
        model = tiny_model("llama", layers=2)
        model.model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))  # first op replayed
        return model

    n_plain, n_ckpt = [], []
    plain = run(tmp_path / "a", model=counted(n_plain))["model"]
    ckpt = run(tmp_path / "b", model=counted(n_ckpt), grad_ckpt=True)["model"]
    assert (len(n_plain), len(n_ckpt)) == (8, 16), "4 steps x 2 micro-steps, recomputed once with checkpointing"
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)
    on = getattr(ckpt, "is_activation_checkpointing", None)
    on = on if on is not None else ckpt.is_gradient_checkpointing
    assert not on and not ckpt.training, "handed back ready for scoring"


def test_selective_checkpointing_recomputes_no_matmul_and_changes_no_result(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            self.n += op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
            return op(*args, **(kwargs or {}))

    def matmuls(policy):  # aten matmuls in one forward and backward, with layer checkpointing by `policy`
        model = tiny_model("qwen2", layers=2).train()  # qwen2: q/k/v have biases, so addmm as well as mm
        if policy:
            fast.checkpointing(model, True, policy)
        with CountMatmuls() as c:
            model(input_ids=torch.arange(3, 19).view(2, 8)).logits.sum().backward()
        return c.n

    plain = matmuls(None)
    assert matmuls("matmuls") == plain < matmuls("full"), "matmuls: pointwise ops recomputed, matmuls kept"
    a = run(tmp_path / "a")["model"]
    b = run(tmp_path / "b", grad_ckpt=True, ckpt_policy="matmuls")["model"]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=k)


def test_a_killed_run_resumes_and_ends_equal_to_an_unbroken_one(tmp_path, monkeypatch):
    real = recover.cosine_lr

    def killed_at_step_3(step, *a):
        if step == 2:
            raise KeyboardInterrupt  # after the checkpoint of step 2, before the update of step 3
        return real(step, *a)

    monkeypatch.setattr(recover, "cosine_lr", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", save_every=2)
    assert (tmp_path / "resumed" / "checkpoints" / "step_2" / "state.pt").exists()
    monkeypatch.setattr(recover, "cosine_lr", real)
    resumed = run(tmp_path / "resumed", save_every=2)
    straight = run(tmp_path / "straight", save_every=2)
    assert resumed["resumed_at"] == 2 and resumed["tokens"] == straight["tokens"]
    a, b = weights(tmp_path / "resumed"), weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(metrics(tmp_path / "resumed")) == drop(metrics(tmp_path / "straight"))
    assert not (tmp_path / "resumed" / "checkpoints").exists(), "resumable state is removed once done"


def test_a_nan_loss_stops_the_run_and_the_last_checkpoint_still_loads(tmp_path, monkeypatch):
    real, calls = recover.micro_loss_sum, []

    def nan_at_step_3(*args):  # 2 micro-steps per step: calls 5 and 6 are step 3
        calls.append(1)
        ce = real(*args)
        return ce * float("nan") if len(calls) > 4 else ce

    monkeypatch.setattr(recover, "micro_loss_sum", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        run(tmp_path, save_every=2)
    assert not (tmp_path / "config.json").exists(), "no final checkpoint from a failed run"
    state = torch.load(tmp_path / "checkpoints" / "step_2" / "state.pt", weights_only=False)
    model = tiny_model("llama", layers=2)
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters()) and state["step"] == 2


def test_a_finished_run_is_not_redone(tmp_path):
    first = run(tmp_path)
    again = run(tmp_path, model=tiny_model("llama", layers=2, seed=9))
    assert again["steps"] == first["steps"] == 4
    assert torch.equal(again["model"].lm_head.weight, first["model"].lm_head.weight)


def test_a_finished_run_whose_weights_changed_since_is_refused_not_returned(tmp_path):
    from safetensors.torch import save_file

    run(tmp_path)
    w = weights(tmp_path)
    name = next(iter(w))
    save_file({**w, name: w[name] + 0.5}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors is not what it wrote"):
        run(tmp_path)


def test_a_finished_run_made_with_other_settings_or_data_is_refused_not_returned(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match=r"finished run made with other settings \{'lr'"):
        run(tmp_path, lr=1e-3)
    with pytest.raises(ValueError, match="or other data"):
        run(tmp_path, texts=TEXTS[:12])
    assert run(tmp_path, save_every=1)["steps"] == 4, "a flag that does not change the run may differ"


def test_resuming_with_other_settings_or_data_is_refused(tmp_path, monkeypatch):
    def killed_at_step_2(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return 1e-3
    monkeypatch.setattr(recover, "cosine_lr", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, save_every=2)
    with pytest.raises(ValueError, match="other data or settings"):
        run(tmp_path, save_every=2, lr=1e-2)
    with pytest.raises(ValueError, match="other data or settings"):
        run(tmp_path, save_every=2, texts=TEXTS[:20])


@pytest.mark.parametrize("kw, match", [
    (dict(global_batch=6, micro_batch=4), "multiple of --micro-batch 4"),
    (dict(global_batch=1000, micro_batch=1), "fewer than one global batch"),
])
def test_batch_settings_that_cannot_work_are_refused(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, **kw)


@pytest.mark.parametrize("content, match", [
    ('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n', r"d.jsonl:2: not valid JSON"),
    ('{"question": "1+1?", "answer": "2"}\n{"prompt": "x"}\n', r"d.jsonl:2: record has fields \['prompt'\]"),
    ("", r"d.jsonl is empty"),
])
def test_malformed_training_data_names_the_file_and_line(content, match, tiny_dirs, tmp_path):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        recover.main(cfg(tmp_path / "out", model=tiny_dirs["llama"], data=str(tmp_path / "d.jsonl")))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_train_like_one_at_the_same_global_batch(fsdp, tiny_dirs, tmp_path):
    # Llama, not Qwen2: Qwen2's k_proj bias has an exactly-zero gradient (a constant added to every key score
    # of a query leaves its softmax unchanged), so it only ever receives rounding noise, which Adam's
    # g / (sqrt(v) + eps) turns into updates that depend on the reduction order (seen: 2e-6 apart).
    flags = ["recover.py", "--model", tiny_dirs["llama"], "--samples", "40", "--max-length", "32", "--global-batch",
             "4", "--micro-batch", "1", "--max-steps", "3", "--lr", "3e-3", "--warmup-ratio", "0.3"] + ["--fsdp"] * fsdp
    subprocess.run([sys.executable, *flags, "--out", str(tmp_path / "one")], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *flags,
                    "--out", str(tmp_path / "two")], cwd=ROOT, check=True)
    assert_trained_alike(weights(tmp_path / "one"), weights(tmp_path / "two"), lr=3e-3, steps=3)
    losses = [[r["loss"] for r in metrics(tmp_path / d)] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_loop_matches_hugging_face_trainer_step_for_step_on_the_same_blocks(tmp_path):
    """A reference check of the loss normalisation, accumulation, clipping, AdamW and cosine schedule."""
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tok, c = char_tokenizer(), cfg(tmp_path / "ours", warmup_ratio=0.0, max_steps=3, lr=1e-2)
    ours = recover.train(tiny_model("llama", layers=2), tok, TEXTS, c)["model"]
    data = recover.pack([ids + [tok.eos_token_id] for ids in tok(TEXTS)["input_ids"]], c.max_length, tok.pad_token_id)
    order = torch.randperm(len(data["input_ids"]), generator=torch.Generator().manual_seed(c.seed))
    ds = datasets.Dataset.from_dict({k: v[order].tolist() for k, v in data.items()})
    losses = []

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            losses.extend([logs["loss"]] if logs and "loss" in logs else [])

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="cosine",
                             warmup_steps=0, max_steps=3, weight_decay=0.0,
                             max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    theirs = tiny_model("llama", layers=2)
    InOrder(model=theirs, args=args, train_dataset=ds, callbacks=[Log()]).train()
    assert [r["loss"] for r in metrics(tmp_path / "ours")] == pytest.approx(losses, rel=1e-5)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
