"""evaluate.py: answer extraction and grading goldens, FLOPs against torch's counter, generation paths that
agree, both engines on the same generations, the report of a real PTL run, and no clash with HF's evaluate."""
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import data
import ptl
import ptl_common
import report
import slicegpt
from conftest import ARCHS, char_tokenizer, tiny_model

ev = ptl_common.import_evaluate()
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, answer", [
    ("Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("So in total they had 32 + 42 = 74. The answer is 1,234.", "1234"),
    ("He pays $2,500.00 in all. The answer is $2,500.00.\n\nQ: next", "2500.00"),
    ("The answer is -3.5.", "-3.5"),
    ("First 5 apples, then 7 more: 12 apples.", "12"),  # no marker: the last number (flexible match)
    ("I do not know.", None),
])
def test_gsm8k_answers_are_extracted_like_lm_eval(text, answer):
    assert ev.extract_answer(text, "gsm8k") == answer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["apples", "cost", "$3", "1,234", "-7", "2.5", "total:", "12.", "$4.50.", "x", "0"]),
                max_size=8))
def test_the_last_number_fallback_agrees_with_lm_eval_flexible_extract(words):
    from lm_eval.filters.extraction import RegexFilter

    text = " ".join(words)
    lm_eval_filter = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    theirs = list(lm_eval_filter.apply([[text]], [None]))[0][0]
    ours = ev.extract_answer(text, "gsm8k")
    assert ours == (None if theirs == "[invalid]" else ev._number(theirs))


@pytest.mark.parametrize("text, answer", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"first \boxed{3}, then on reflection \boxed{4}.", "4"),  # several boxes: the last counts
    (r"$\boxed{\sqrt{\frac{1}{2}}}$ units", r"\sqrt{\frac{1}{2}}"),  # nested braces
    ("We get 24.\nFinal Answer: The final answer is $24$. I hope it is correct.", "24"),  # Minerva's format
    (r"an unfinished \boxed{\frac{1}{2}", None),
    ("no answer at all", None),
])
def test_boxed_answers_are_the_last_balanced_box(text, answer):
    assert ev.extract_answer(text, "boxed") == answer


@pytest.mark.parametrize("pred, gold, ok", [
    ("0.5", r"\frac12", True), (r"\frac{2}{4}", "0.5", True), ("18", "18", True), ("2500.00", "2500", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("3", "4", False), (None, "4", False), ("}{", "4", False),
])
def test_equivalent_forms_are_correct_and_different_values_are_not(pred, gold, ok):
    assert ev.math_equal(pred, gold) is ok


def test_a_grading_timeout_is_reported_not_called_correct(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow(*a, **k):
        raise TimeoutException("timed out")
    monkeypatch.setattr(math_verify, "verify", slow)
    assert ev.math_equal("0.5", r"\frac12") is None


def _counted(model, T: int) -> int:
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (2, T)))
    return fc.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_equal_torch_flop_counter_before_and_after_surgery(arch):
    model = tiny_model(arch, layers=3, inter=24)
    assert report.forward_flops(model.config, 17, batch=2) == _counted(model, 17)
    ptl.prune_neurons(model, [torch.arange(0, 24, 2)] * 3)
    ptl.drop_layers(model, [1])
    assert report.forward_flops(model.config, 17, batch=2) == _counted(model, 17)


def test_pruning_k_neurons_per_layer_saves_exactly_6_h_k_L_flops_per_token():
    model = tiny_model("llama", layers=3, inter=24)
    before = report.forward_flops(model.config, 50)
    ptl.prune_neurons(model, [torch.arange(5, 24)] * 3)  # k = 5
    h, L = model.config.hidden_size, model.config.num_hidden_layers
    assert before - report.forward_flops(model.config, 50) == 2 * 3 * h * 5 * L * 50


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: sliding-window layers in the shared prefix
def test_generation_from_the_cached_shared_prefix_equals_plain_generation(arch):
    model, tok = tiny_model(arch, layers=2, max_position_embeddings=512), char_tokenizer()
    shared = "Q: 2+2?\nA: 4.\n\nQ: 3+5?\nA: 8.\n\n"
    prompts = [shared + q for q in ("Q: 1+1?\nA:", "Q: 10+20?\nA:", "Q: 7?\nA:", "Q: 123+456?\nA:")]
    kw = dict(max_new_tokens=12, stop=["Q:"], batch_size=3, add_bos=True)
    cached, n1 = ev.generate(model, tok, prompts, **kw)
    plain, n2 = ev.generate(model, tok, prompts, reuse_prefix=False, **kw)
    assert cached == plain and n1 == n2
    one_by_one = [ev.generate(model, tok, [p], reuse_prefix=False, **{**kw, "batch_size": 1})[0][0] for p in prompts]
    assert plain == one_by_one, "left padding changed a greedy generation"
    for p, text in zip(prompts, one_by_one):  # the reference: transformers' own greedy generate
        x = tok(p, return_tensors="pt")
        ref = model.generate(**x, do_sample=False, max_new_tokens=12, pad_token_id=0, temperature=None, top_p=None,
                             top_k=None)
        assert text == ev._cut(tok.decode(ref[0, x["input_ids"].shape[1]:], skip_special_tokens=True), ["Q:"])


def test_cached_generation_and_gold_logprobs_use_the_current_kv_cache_argument():
    import warnings

    model, tok = tiny_model("llama", layers=1), char_tokenizer()
    prompts = ["Q: 2+2?\nA: 4.\n\nQ: 1+1?\nA:", "Q: 2+2?\nA: 4.\n\nQ: 3?\nA:"]
    with warnings.catch_warnings():  # transformers warns on `past_key_values` where it renamed it `cache`
        warnings.filterwarnings("error", message=".*past_key_values.*")
        ev.generate(model, tok, prompts, max_new_tokens=3, stop=[], batch_size=2, add_bos=True)
        ev.gold_logprobs(model, tok, prompts, [" 2.", " 3."], batch_size=2, add_bos=True)


def _gsm8k_dir(tmp_path: Path, n: int = 3) -> Path:
    """A --data-dir with a GSM8K-format test file (made-up questions; real data stays in ../shared/data)."""
    (tmp_path / "gsm8k").mkdir(parents=True)
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many?",
             "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(1, n + 1)]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.mark.parametrize("sliced", [False, True], ids=["stock", "slicegpt"])
def test_both_engines_make_the_same_generations_and_extract_the_same_answers(sliced, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_model("llama", layers=2, max_position_embeddings=4096), char_tokenizer()
    if sliced:  # a SliceGPT model goes through lm-eval's HFLM like a stock one
        slicegpt.slice_model(model, [tok(["Tom has 3 apples.", "How many?"], return_tensors="pt", padding=True)], 16)
    cfg = ev.Config(tasks="gsm8k", data_dir=str(_gsm8k_dir(tmp_path)), limit=3, max_new_tokens=24, batch_size=2,
                    device="cpu")
    ours = ev.evaluate_model(model, tok, cfg)["gsm8k"]
    theirs = ev.evaluate_model(model, tok, ev.Config(**{**cfg.__dict__, "engine": "lm-eval"}))["gsm8k"]
    assert ours["n"] == theirs["n"] == 3
    by_q = {s["question"]: s for s in theirs["samples"]}
    for s in ours["samples"]:
        t = by_q[s["question"]]
        assert s["output"] == t["output"]
        flexible = t["filtered"]["flexible-extract"]
        if flexible != "[invalid]":
            assert ev.extract_answer(t["output"], "gsm8k") == ev._number(flexible)


def test_builtin_engine_counts_every_question_once_on_two_ranks(tmp_path):
    model_dir = tmp_path / "m"
    tiny_model("llama", layers=2, max_position_embeddings=4096).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = _gsm8k_dir(tmp_path / "data", n=5)
    flags = ["evaluate.py", "--model", str(model_dir), "--tasks", "gsm8k", "--data-dir", str(data),
             "--max-new-tokens", "6"]
    subprocess.run([sys.executable, *flags, "--out", str(tmp_path / "one.json")], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *flags,
                    "--out", str(tmp_path / "two.json")], cwd=ROOT, check=True)
    a, b = (json.loads((tmp_path / f).read_text())[str(model_dir)]["gsm8k"] for f in ("one.json", "two.json"))
    for k in ("n", "correct", "no_answer", "gen_tokens", "flops_per_question"):
        assert a[k] == pytest.approx(b[k]), k
    assert a["n"] == 5


PROBE_YAML = """task: probe_hf_evaluate
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 2, do_sample: false}}
process_results: !function utils.process_results
metric_list:
  - {{metric: hf_evaluate, aggregation: mean, higher_is_better: true}}
"""
PROBE_UTILS = """import evaluate  # Hugging Face's package, as lm-eval's mbpp / squad tasks import it


def process_results(doc, results):
    return {"hf_evaluate": float(hasattr(evaluate, "load") and "site-packages" in evaluate.__file__)}
"""


def test_scripts_run_from_the_repo_root_leave_import_evaluate_to_hugging_face(tmp_path, tiny_dirs):
    """`python evaluate.py` and `python ptl.py` put the checkout first on sys.path, where our evaluate.py would
    answer an lm-eval task's `import evaluate`; a task that imports it must get Hugging Face's package."""
    pytest.importorskip("evaluate")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "probe.jsonl").write_text('{"q": "hi", "a": "x"}\n')
    (tmp_path / "tasks" / "probe.yaml").write_text(PROBE_YAML.format(data=tmp_path / "probe.jsonl"))
    (tmp_path / "tasks" / "utils.py").write_text(PROBE_UTILS)
    flags = (f"--engine lm-eval --tasks '' --lm-eval-tasks probe_hf_evaluate --include-path {tmp_path / 'tasks'} "
             "--max-new-tokens 4")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "evaluate.py", "--model", tiny_dirs["llama"], *shlex.split(flags),
                    "--out", str(tmp_path / "r.json")], cwd=ROOT, check=True, env=env)
    assert json.loads((tmp_path / "r.json").read_text())[tiny_dirs["llama"]]["probe_hf_evaluate"]["accuracy"] == 1.0
    subprocess.run([sys.executable, "ptl.py", "--model", tiny_dirs["llama"], "--calib-samples", "4", "--rounds", "1",
                    "--eval-every-round", "--eval-flags", flags, "--out", str(tmp_path / "run")], cwd=ROOT, check=True,
                   env=env)
    assert ptl_common.load_record(tmp_path / "run" / "round_1")["eval"]["probe_hf_evaluate"]["accuracy"] == 1.0


def test_the_report_renders_from_a_real_ptl_run(tmp_path, tiny_dirs):
    data = _gsm8k_dir(tmp_path / "data", n=2)
    cfg = ptl.Config(model=tiny_dirs["llama"], calib_samples=4, max_length=32, rounds=2, order="alternate",
                     layer_target=1, out=str(tmp_path / "run"), eval_every_round=True,
                     eval_flags=f"--tasks gsm8k --data-dir {data} --max-new-tokens 4 --no-add-bos")
    ptl.main(cfg)
    res = report.write_report(tmp_path / "run")
    assert [r["model"] for r in res["rows"]] == ["dense", "round 1 (neurons)", "round 2 (layers)"]
    assert all("gsm8k" in r["accuracy"] for r in res["rows"])
    assert res["rows"][0]["flop_ratio_128"] == 1.0 < res["rows"][1]["flop_ratio_128"] < res["rows"][2]["flop_ratio_128"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.count("\n| round ") == 2 and (tmp_path / "run" / "rounds.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"][2]["layers"] == 3


def test_unknown_tasks_and_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        ev.Config(tasks="gsm9k").task_list()
    with pytest.raises(FileNotFoundError, match="--data-dir must hold gsm8k/test.jsonl"):
        ev.load_benchmark("gsm8k", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no finished PTL round"):
        report.write_report(tmp_path)


def test_the_report_gives_compression_ratio_and_retention_against_the_dense_row(tmp_path, tiny_dirs):
    ptl.main(ptl.Config(model=tiny_dirs["llama"], calib_samples=4, max_length=32, rounds=1, out=str(tmp_path)))
    (tmp_path / "dense_eval.json").write_text(json.dumps({"gsm8k": {"accuracy": 0.5, "gold_logprob": -1.25}}))
    rec = ptl_common.load_record(tmp_path / "round_1")
    ev1 = {"gsm8k": {"accuracy": 0.2, "gold_logprob": -1.5}}
    (tmp_path / "round_1" / "ptl_record.json").write_text(json.dumps({**rec, "eval": ev1}))
    res = report.write_report(tmp_path)
    dense, r1 = res["rows"]
    assert dense["retention"] == {"gsm8k": 1.0} and r1["retention"] == {"gsm8k": pytest.approx(0.4)}
    assert "gsm8k gold log-prob" in res["markdown"] and "| -1.2500 |" in res["markdown"] and "| -1.5000 |" in res[
        "markdown"], "the metric that moves on a small model is in the table"
    assert dense["flops_128"] > r1["flops_128"] and "GFLOPs (128 tokens)" in res["markdown"]
    assert r1["removed"] == pytest.approx(1 - rec["params_after"]["total"] / rec["params_before"]["total"])


def test_the_offline_benchmark_is_the_held_out_split_asked_zero_shot_in_the_training_format():
    rows = ev.load_benchmark("offline", "", limit=6)
    assert len(rows) == 6 and all(data.held_out(r.question) for r in rows)
    test = data.OfflineReasoning(0, split="test")
    assert rows == [(test[i]["question"], test[i]["final"], test[i]["answer"]) for i in range(6)]
    prompts, stop = ev.build_prompts("offline", [rows[0][0]], char_tokenizer(), "fewshot")
    assert prompts == [f"Question: {rows[0][0]} Answer:"] and stop == ["Question:"]
    assert ev.extract_answer(test[0]["answer"], ev.BENCHMARKS["offline"][2]) == test[0]["final"]
    with pytest.raises(ValueError, match="no lm-eval task here"):
        ev.evaluate_lm_eval(None, None, ev.Config(tasks="offline", engine="lm-eval"))


def test_compare_evaluates_every_model_and_times_each_against_the_first(tmp_path, tiny_dirs):
    ptl.main(ptl.Config(model=tiny_dirs["llama"], calib_samples=4, max_length=32, rounds=2, order="alternate",
                        layer_target=1, out=str(tmp_path)))
    a, b = str(tmp_path / "round_1"), str(tmp_path / "round_2")
    res = ev.main(ev.Config(model=tiny_dirs["llama"], compare=f"{a},{b}", tasks="offline", limit=3, max_new_tokens=3,
                            warmup=0, repeats=1, speed_new_tokens=3, out=str(tmp_path / "eval.json")))
    assert [k for k in res if k != "speed"] == [tiny_dirs["llama"], a, b]
    assert all(res[k]["offline"]["n"] == 3 for k in (a, b))
    s = res["speed"]
    assert 1.0 < s[a]["flop_ratio_128"] < s[b]["flop_ratio_128"], "round 2 also drops a layer"
    assert s[b]["params"]["total"] < s[a]["params"]["total"] < s[tiny_dirs["llama"]]["params"]["total"]
    assert all(s[k]["prefill_speedup"] > 0 and s[k]["decode_speedup"] > 0 for k in (a, b))
    assert json.loads((tmp_path / "eval.json").read_text())["speed"][b]["flop_ratio_128"] == s[b]["flop_ratio_128"]
    with pytest.raises(ValueError, match="same model twice"):
        ev.main(ev.Config(model=a, compare=a, tasks="offline"))


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("the Eiffel Tower!", ["Eiffel tower"], 1.0, 1.0),  # case, punctuation and articles do not count
    ("in Paris France", ["Paris"], 0.0, 0.5),  # P = 1/3, R = 1: F1 = 2 * 1/3 / (4/3)
    ("Denver Broncos", ["Carolina Panthers", "Broncos"], 0.0, 2 / 3),  # the best gold: P = 1/2, R = 1
    ("nothing", ["Paris"], 0.0, 0.0),
])
def test_squad_exact_match_and_f1_follow_the_official_script(pred, golds, em, f1):
    assert ev.squad_scores(pred, golds) == (em, pytest.approx(f1))


def test_generated_code_passes_only_with_its_tests_in_time_and_offline():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert ev.passes_tests("def add(a, b):\n    return a + b\n" + tests)
    assert not ev.passes_tests("def add(a, b):\n    return a * b\n" + tests)
    assert not ev.passes_tests("def add(a, b):\n    return a +\n" + tests), "a syntax error fails"
    assert not ev.passes_tests("while True:\n    pass", timeout=1.0), "a program that never ends fails at the timeout"
    assert not ev.passes_tests("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not ev.passes_tests("import os\nassert os.environ.get('HOME')"), "the environment is empty"


def test_mbpp_prompts_are_lm_evals_three_shot_prompts():
    import jinja2
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    spec = yaml.load((ev.lm_eval_tasks_dir() / "mbpp" / "mbpp.yaml").read_text(), Loader=Loader)
    rec = {"text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]}
    env = jinja2.Environment(keep_trailing_newline=True)  # as lm_eval.utils renders its templates
    text, target = env.from_string(spec["doc_to_text"]), env.from_string(spec["doc_to_target"])
    assert ev.mbpp_text(rec) == text.render(**rec)
    q, tests, code = ev.benchmark_row("mbpp", rec, "x")
    assert code == rec["code"], "the reference solution of the gold log-prob"
    assert tests == target.render(**rec), "the asserts are lm-eval's reference"
    shots, _, stop, delim = ev.fewshot("mbpp")
    assert len(shots) == 3 and stop == spec["generation_kwargs"]["until"] and delim == spec["target_delimiter"]
    assert shots[0][1] == target.render(**{**ev.mbpp_fewshot_records()[0], "is_fewshot": True})
    prompt = ev.build_prompts("mbpp", [q], char_tokenizer(), "fewshot")[0][0]
    assert prompt.endswith("[DONE]\n\n" + text.render(**rec)) and prompt.count("[BEGIN]") == 4


def test_mbpp_and_squad_are_graded_end_to_end_from_local_files(tmp_path, monkeypatch):
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "squad").mkdir()
    mbpp = [{"task_id": 11, "text": "Add.", "code": "", "test_list": ["assert add(1, 2) == 3"] * 3},
            {"task_id": 12, "text": "Double.", "code": "", "test_list": ["assert dbl(2) == 4"] * 3}]
    squad = [{"title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
              "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}},
             {"title": "T", "context": "Blue sky.", "question": "What colour?",
              "answers": {"text": ["blue"], "answer_start": [0]}}]
    (tmp_path / "mbpp" / "test.jsonl").write_text("\n".join(map(json.dumps, mbpp)))
    (tmp_path / "squad" / "validation.jsonl").write_text("\n".join(map(json.dumps, squad)))
    outputs = {"Add.": "def add(a, b):\n    return a + b\n", "Double.": "def dbl(x):\n    return x + 1\n",
               "Where is Paris?": " France", "What colour?": " the sky is blue"}

    def fake_generate(model, tok, prompts, **kw):  # the model's part is tested above; here: rows, prompts, grading
        texts = [next(v for k, v in outputs.items() if k in p[-200:]) for p in prompts]  # the question asked last
        return texts, [(len(p), 3) for p in prompts]

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = tiny_model("llama")
    res = ev.evaluate_builtin(model, char_tokenizer(), ev.Config(tasks="mbpp,squad", data_dir=str(tmp_path)))
    assert res["mbpp"]["correct"] == 1 and res["mbpp"]["accuracy"] == 0.5
    assert res["squad"]["accuracy"] == 0.5 and res["squad"]["f1"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="line|fields"):
        ev.benchmark_row("squad", {"question": "q"}, "squad.jsonl:3")


def _plain_logprob(model, tok, prompt: str, continuation: str) -> float:
    """The reference: one uncached forward over prompt + continuation, log-softmax, the continuation's tokens."""
    n = len(tok(prompt)["input_ids"])
    ids = torch.tensor([tok(prompt + continuation)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(lp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_gold_logprob_equals_a_plain_forward_with_and_without_a_shared_prefix_at_any_batch(arch):
    model, tok = tiny_model(arch), char_tokenizer()
    head = "Q: 1 + 1 = ? A: 2\n\n"  # a few-shot head every prompt shares: its KV cache is reused
    prompts = [head + "Q: 3 + 4 = ? A:", head + "Q: 12 + 30 = ? A:", head + "Q: 5 = ? A:"]
    conts = [" 3 + 4 = 7.", " 12 + 30 = 42, so 42.", " 5."]
    want = [_plain_logprob(model, tok, p, c) for p, c in zip(prompts, conts)]
    for batch_size in (1, 2, 3):
        got = ev.gold_logprobs(model, tok, prompts, conts, batch_size=batch_size, add_bos=True)
        assert got == pytest.approx(want, abs=1e-5)
    alone = ev.gold_logprobs(model, tok, prompts[1:2], conts[1:2], batch_size=1, add_bos=True)  # no shared prefix
    assert alone == pytest.approx(want[1:2], abs=1e-5)


def test_gold_logprob_of_a_model_with_uniform_next_token_odds_is_minus_log_vocab():
    model, tok = tiny_model("llama"), char_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for each of the V = 128 tokens (tied: embeddings too)
    got = ev.gold_logprobs(model, tok, ["Q: 2 + 2 A:", "Q: 9 A:"], [" 4", " nine."], batch_size=2, add_bos=True)
    assert got == pytest.approx([-math.log(128)] * 2, abs=1e-6)
    with pytest.raises(ValueError, match="adds no tokens"):
        ev.gold_logprobs(model, tok, ["Q:"], [""], batch_size=1, add_bos=True)


def test_gold_logprob_is_a_metric_of_its_own_with_one_score_per_question():
    model, tok = tiny_model("llama"), char_tokenizer()
    cfg = ev.Config(tasks="offline", limit=3, metrics="gold_logprob", batch_size=2, device="cpu")
    res = ev.evaluate_builtin(model, tok, cfg)["offline"]
    assert "accuracy" not in res and "output" not in res["samples"][0], "no generation was asked for"
    rows = ev.load_benchmark("offline", "", limit=3)
    want = [_plain_logprob(model, tok, f"Question: {r.question} Answer:", " " + r.reference) for r in rows]
    assert [s["gold_logprob"] for s in res["samples"]] == pytest.approx(want, abs=1e-5)
    assert res["gold_logprob"] == pytest.approx(sum(want) / 3, abs=1e-5) and res["gold_logprob_n"] == res["n"] == 3
    both = ev.evaluate_builtin(model, tok, replace(cfg, metrics="accuracy,gold_logprob", max_new_tokens=2))["offline"]
    assert "accuracy" in both and both["gold_logprob"] == pytest.approx(res["gold_logprob"], abs=1e-6)
    with pytest.raises(ValueError, match="choose one or more of accuracy, gold_logprob"):
        ev.Config(metrics="perplexity").metric_list()
