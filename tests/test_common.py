"""Shared plumbing: data sources, the offline reasoning data, batching, config flags, atomic writes."""
import json
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

import models
import ptl_common
from conftest import char_tokenizer
from data import OfflineReasoning, held_out, load_texts, make_batches, offline_reasoning, record_text
from ptl_common import atomic_dir, atomic_write_json, parse_config


def test_offline_reasoning_is_deterministic_and_its_arithmetic_is_right():
    a, b = offline_reasoning(40, seed=3), offline_reasoning(40, seed=3)
    assert a == b and a != offline_reasoning(40, seed=4)
    for item in a:
        for lhs, rhs in re.findall(r"(?<![\d-])(-?\d+(?: [-+*] -?\d+)+) = (-?\d+)", item["answer"]):
            assert eval(lhs) == int(rhs), item["answer"]  # noqa: S307  integers and + - * only
        assert item["answer"].startswith("<think>")
        assert item["answer"].endswith(f"</think> The answer is \\boxed{{{item['final']}}}.")
    assert [("legs" in i["question"]) for i in a[:4]] == [False, True, False, True], "the two tasks alternate"
    easy = [OfflineReasoning(3, easy=True)[i] for i in range(20)]
    pattern = r"<think>-?\d [-+] -?\d = -?\d+\.</think> The answer is \\boxed\{-?\d+\}\."
    assert all(re.fullmatch(pattern, e["answer"]) for e in easy)


def test_no_held_out_problem_is_in_any_training_slice_under_any_seed():
    test = OfflineReasoning(0, split="test")
    held = {test[i]["question"] for i in range(300)}
    assert all(held_out(q) for q in held) and len(held) > 250
    for seed in (0, 1, 7):  # reasoning-gym seeds item i with seed + i: other seeds reuse the same problems
        train = OfflineReasoning(seed)
        seen = {train[i]["question"] for i in range(3000)}
        assert not seen & held and not any(held_out(q) for q in seen)
    raw = [OfflineReasoning(0)._item(i)["question"] for i in range(3000)]
    assert 0.03 < sum(map(held_out, raw)) / len(raw) < 0.1, "about 1 problem in 16 is held out"
    assert [OfflineReasoning(0)[i] for i in range(50)] == [OfflineReasoning(0)[i] for i in range(50)]


@pytest.mark.parametrize("rec, text", [
    ({"question": "q", "answer": "a"}, "Question: q Answer: a"),
    ({"problem": "p", "solution": "s", "answer": "x"}, "Question: p Answer: s"),  # MATH: the CoT, not the bare answer
    ({"query": "q", "response": "r"}, "Question: q Answer: r"),  # MetaMathQA
    ({"text": "plain", "question": "q", "answer": "a"}, "plain"),
    ({"content": "def f():\n    return 1\n", "max_stars_repo_path": "f.py"}, "def f():\n    return 1\n"),  # StarCoder
    ({"instruction": "Write f.", "output": "def f(): pass"}, "Question: Write f. Answer: def f(): pass"),  # opc-sft
])
def test_records_become_the_papers_question_answer_sequences(rec, text):
    assert record_text(rec, "x") == text


def test_hub_specs_name_a_config_or_a_subfolder(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: calls.append((repo, kw)) or [{"text": "t"}])
    monkeypatch.setattr(models, "hub_unreachable", lambda: False)
    load_texts("a/b:cfg,c/d:data_dir=python,e/f", n=3, seed=0)
    assert calls == [("a/b", {"split": "train", "name": "cfg"}), ("c/d", {"split": "train", "data_dir": "python"}),
                     ("e/f", {"split": "train", "name": None})]


def test_sources_mix_and_sample_deterministically(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"question": f"a{i}", "answer": "1"}) for i in range(5)))
    b = datasets.Dataset.from_list([{"problem": f"b{i}", "solution": "2"} for i in range(5)])
    b.to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("c0\n\nc1\n")
    spec = ",".join(str(tmp_path / f) for f in ("a.jsonl", "b.parquet", "c.txt"))
    every = load_texts(spec, n=0, seed=0)
    assert len(every) == 12 and "c1" in every and "Question: b4 Answer: 2" in every
    assert load_texts(spec, n=6, seed=1) == load_texts(spec, n=6, seed=1) != load_texts(spec, n=6, seed=2)
    assert len(set(load_texts(spec, n=6, seed=1))) == 6
    assert len(load_texts("offline", n=7, seed=0)) == 7


def test_slices_at_different_offsets_never_overlap_and_running_out_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(30)))
    spec = f"{tmp_path / 'a.jsonl'},offline"
    rounds = [load_texts(spec, n=10, seed=0, offset=10 * t) for t in range(3)]
    assert sum(len(set(r)) for r in rounds) == len(set().union(*rounds)) == 30
    assert load_texts(spec, n=20, seed=0)[10:] == rounds[1], "a slice is part of one fixed permutation"
    with pytest.raises(ValueError, match="holds 30"):
        load_texts(str(tmp_path / "a.jsonl"), n=10, seed=0, offset=25)
    with pytest.raises(ValueError, match="without end"):
        load_texts("offline", n=0, seed=0)


def test_batches_are_right_padded_with_a_mask_of_the_real_tokens():
    tok = char_tokenizer()
    texts = ["ab", "abcdef", "abcd", "a"]
    batches = make_batches(tok, texts, max_length=5, batch_size=3)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([3, 5]), torch.Size([1, 2])]
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]  # <s> + up to 4 characters
    assert (ids[mask == 0] == tok.pad_token_id).all() and ids[2, :3].tolist() == tok("ab")["input_ids"]


@dataclass
class Toy:
    """A toy config."""
    batch_size: int = 8
    sigma_neuron: float | None = None
    order: Literal["neu-lay", "lay-neu"] = "neu-lay"
    grad_ckpt: bool = False
    name: str = field(default="x", metadata={"help": "a name"})


def test_flags_are_kebab_case_with_defaults_from_the_dataclass():
    assert parse_config(Toy, []) == Toy()
    cfg = parse_config(Toy, ["--batch-size", "4", "--sigma-neuron", "0.5", "--order", "lay-neu", "--grad-ckpt"])
    assert cfg == Toy(batch_size=4, sigma_neuron=0.5, order="lay-neu", grad_ckpt=True)
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--order", "sideways"])


def test_atomic_writes_leave_either_nothing_or_the_whole_thing(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "round_1") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with atomic_dir(tmp_path / "round_1") as tmp:
        (tmp / "whole").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "round_1") as tmp:
            (tmp / "other").write_text("y")
    assert sorted(p.name for p in (tmp_path / "round_1").iterdir()) == ["whole"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "round_1"]


def test_an_empty_text_is_refused_rather_than_scored_as_padding():
    tok = char_tokenizer()
    tok._tokenizer.post_processor = None  # no <s>: "" has no tokens at all
    with pytest.raises(ValueError, match="text #1"):
        make_batches(tok, ["ab", ""], max_length=8, batch_size=2)


def test_spread_is_the_range_of_repeated_timings_over_their_median():
    assert ptl_common.spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert ptl_common.spread([2.0, 2.0]) == 0.0


def test_alternate_times_every_function_in_every_round_after_the_warmup():
    calls = []
    times = ptl_common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
