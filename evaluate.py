"""Evaluation: the paper's Table 1 metrics (Section 3.1) and the report of a PTL run (Figure 3, Table 6).

Accuracy on GSM8K, Minerva Math and MATH-500 (Table 1), MBPP pass@1 (Table 4), SQuAD exact match and F1
(Table 5), and held-out generated arithmetic (`offline`, for the CPU experiment); FLOPs per question; measured
speedup of pruned models over the dense one. Prompts, grading and the two engines: docs/evaluation.md.

    python evaluate.py --model out/smollm2/round_2 --tasks gsm8k,minerva_math,math500 --data-dir ../shared/data
    python evaluate.py --model smollm2-135m --compare out/smollm2/round_2 --tasks gsm8k --data-dir ../shared/data
    python evaluate.py --model smollm2-135m --tasks gsm8k --data-dir ../shared/data --engine lm-eval --limit 20
    python evaluate.py --report out/smollm2           # report.md, report.json, rounds.png

Hugging Face's `evaluate` package has this module's import name, and lm-eval imports it inside some tasks: this
file is never installed; ptl.py loads it as `ptl_evaluate` (ptl_common.import_evaluate), and run as a script it
moves its own directory behind site-packages so that `import evaluate` finds Hugging Face's.
"""
from __future__ import annotations

import ast
import math
import os
import re
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from tqdm import tqdm

from data import OfflineReasoning, chat_prompt, last_boxed, math_equal, pad_id, question_answer, read_jsonl
from fast import cache_arg, common_prefix, decode, eos_ids, prefix_cache, repeat_cache, shares_prefix
from models import DEFAULT_MODEL, load_model
from ptl_common import (all_reduce_dict, alternate, atomic_write_json, check_ranges, check_read, cleanup_dist,
                        count_params, flag, is_main, parse_config, print0, run_cli, setup_dist, spread,
                        unshadow_evaluate)
from report import forward_flops, summary_line, write_report

CHAT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # R1-style evaluator
class Benchmark(NamedTuple):
    file: str | None  # under --data-dir (the layout of ../shared/data)
    hub: str | None  # "repo:config"
    style: str  # how an output is graded: gsm8k, boxed (math-verify), code (MBPP tests), squad (EM/F1)
    lm_eval: str | None  # lm-eval's task of the same benchmark
    split: str = "test"


BENCHMARKS = {
    "gsm8k": Benchmark("gsm8k/test.jsonl", "openai/gsm8k:main", "gsm8k", "gsm8k_cot"),
    "minerva_math": Benchmark("minerva_math/test.jsonl", None, "boxed", "minerva_math"),
    "math500": Benchmark("math500/test.jsonl", "HuggingFaceH4/MATH-500", "boxed", "minerva_math500"),
    "offline": Benchmark(None, None, "boxed", None),  # held-out generated arithmetic (data.held_out)
    "mbpp": Benchmark("mbpp/test.jsonl", "google-research-datasets/mbpp:full", "code", "mbpp"),  # Table 4
    "squad": Benchmark("squad/validation.jsonl", "rajpurkar/squad", "squad", None, "validation"),  # Table 5 (v1.1)
}
OFFLINE_SIZE = 1000  # questions of `offline` without --limit
OFFLINE_MAX = 20000  # the most `offline` gives: it is generated, so a larger --limit would never end
METRICS = ("accuracy", "gold_logprob")
LOGPROB_TOKENS = 1024  # tokens per teacher-forced batch: larger ones spend their time moving logits, not computing


class Row(NamedTuple):
    question: str
    gold: object  # the graded answer: a number / expression, MBPP's asserts, SQuAD's list of answers
    reference: str | None  # the benchmark's worked solution, scored by gold_logprobs (None: the record has none)

# ----------------------------------------------------------------------------- answers (pure)

_NUM = r"-?[$0-9.,]{2,}|-?[0-9]+"  # lm-eval gsm8k_cot's flexible-extract pattern


def _number(s: str) -> str:
    return s.replace(",", "").replace("$", "").rstrip(".")


def extract_answer(text: str, style: str) -> str | None:
    """The final answer of a generation, or None (counted wrong).

    gsm8k: "#### N", else "The answer is N" (gsm8k_cot's strict match), else the last number (its flexible
    match); commas, "$" and a trailing "." dropped. boxed: the last brace-balanced \\boxed{...}, else Minerva's
    "Final Answer: The final answer is X. I hope it is correct." """
    if style == "gsm8k":
        for pattern in (r"####\s*(-?[0-9.,$]+)", r"The answer is (-?[0-9.,$]+)"):
            if m := re.search(pattern, text):
                return _number(m.group(1)) or None
        nums = [m.group(0) for m in re.finditer(_NUM, text)]
        return next((_number(n) for n in reversed(nums) if _number(n).strip("-.")), None)
    if style == "boxed":
        if (b := last_boxed(text)) is not None:
            return b.strip()
        m = re.search(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", text, re.DOTALL)
        return m.group(1).strip().strip("$").strip() if m else None
    raise ValueError(f"unknown answer style {style!r}: use 'gsm8k' or 'boxed'")


_PUNCTUATION = set(string.punctuation)


def squad_normalize(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def squad_scores(pred: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of a prediction against SQuAD's gold answers, each the maximum over the golds (the
    official v1.1 script): F1 = 2 P R / (P + R) over the bags of normalised tokens."""
    p = squad_normalize(pred)

    def f1(g: str) -> float:
        same = sum((Counter(p.split()) & Counter(g.split())).values())
        # 2PR / (P + R) with P = same / |p|, R = same / |g|
        return 0.0 if same == 0 else 2 * same / (len(p.split()) + len(g.split()))
    golds = [squad_normalize(g) for g in golds]
    return max(float(p == g) for g in golds), max(f1(g) for g in golds)


# Run before a generated program: a guard against accidents (OpenAI human-eval's reliability_guard, in short),
# not a security boundary; grade untrusted models in a container.
_GUARD = """import os, resource, shutil, socket, subprocess
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
def _off(*a, **k): raise PermissionError("disabled while grading generated code")
socket.socket = socket.create_connection = socket.getaddrinfo = _off
os.system = os.kill = os.fork = os.remove = os.unlink = os.rmdir = os.rename = shutil.rmtree = subprocess.Popen = _off
del os, resource, shutil, socket, subprocess
"""


def passes_tests(program: str, timeout: float = 10.0) -> bool:
    """Whether `program` (generated code + its asserts) exits cleanly within `timeout` seconds, run by a fresh
    `python -I` in an empty temporary directory with an empty environment, 2 GiB of memory, and no network,
    process creation or file deletion (_GUARD)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "program.py").write_text(_GUARD + program)
        try:
            return subprocess.run([sys.executable, "-I", "program.py"], cwd=d, env={}, capture_output=True,
                                  timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False


# ----------------------------------------------------------------------------- benchmarks and prompts


def benchmark_file(name: str, data_dir: str) -> Path:
    """The local file of benchmark `name` under --data-dir (the layout of ../shared/data); it must exist."""
    path = (Path(data_dir).expanduser() / BENCHMARKS[name].file).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data-dir must hold {BENCHMARKS[name].file} (the layout of "
                                "../shared/data)")
    return path


def load_benchmark(name: str, data_dir: str = "", limit: int = 0) -> list[Row]:
    """(question, gold answer, reference solution) rows of a benchmark in file order: from --data-dir (the
    ../shared/data layout) or, without it, the hub; `offline` is generated (the held-out split of
    data.OfflineReasoning)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(BENCHMARKS)}")
    hub = BENCHMARKS[name].hub
    if name == "offline":  # the test split: disjoint from every offline training and calibration row
        ds = OfflineReasoning(seed=0, split="test")
        n = min(limit or OFFLINE_SIZE, OFFLINE_MAX)
        return [Row(r["question"], r["final"], r["answer"]) for r in (ds[i] for i in range(n))]
    if data_dir:
        rows = read_jsonl(benchmark_file(name, data_dir))
    elif hub is None:
        raise ValueError(f"{name}: the 272 Minerva OCW problems have no hub copy; pass --data-dir, or use "
                         "--engine lm-eval for lm-eval's minerva_math (the MATH test set)")
    else:
        import datasets

        repo, _, config = hub.partition(":")
        split = BENCHMARKS[name].split
        rows = [(f"{hub}[{i}]", r) for i, r in enumerate(datasets.load_dataset(repo, config or None, split=split))]
    if not rows:
        raise ValueError(f"{name}: no rows")
    return [benchmark_row(name, r, where) for where, r in rows[: limit or None]]


def benchmark_row(name: str, rec: dict, where: str) -> Row:
    """One record as a Row: MBPP's prompt as lm-eval renders it, its asserts and its reference code; SQuAD's
    passage and question, the list of its gold answers, the first of them as reference; the math benchmarks'
    question and answer (data.question_answer), the record's worked solution as reference (GSM8K's `answer`,
    MATH's `solution`)."""
    try:
        if name == "mbpp":
            return Row(mbpp_text(rec), "\n".join(rec["test_list"]), rec.get("code"))
        if name == "squad":
            golds = rec["answers"]["text"] if isinstance(rec["answers"], dict) else rec["answers"]
            return Row(f"Title: {rec['title']}\n\nBackground: {rec['context']}\n\nQuestion: {rec['question']}\n\n"
                       "Answer:", list(golds), golds[0] if golds else None)  # lm-eval squadv2's doc_to_text
    except (KeyError, TypeError) as e:
        need = "text, test_list" if name == "mbpp" else "title, context, question, answers"
        raise ValueError(f"{where}: a {name} record needs the fields {need} (the hub dataset's); it has "
                         f"{sorted(rec)}") from e
    solution = next((rec[k] for k in ("solution", "answer") if isinstance(rec.get(k), str)), None)
    return Row(*question_answer(rec, where), solution)


def mbpp_text(rec: dict) -> str:
    """lm-eval mbpp's doc_to_text: the task and its first three asserts, then "[BEGIN]"."""
    tests = "\n".join(rec["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {rec['text']} Your code should pass these "
            f"tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_fewshot_records() -> list[dict]:
    """lm-eval mbpp's 3 worked examples (MBPP's prompt split, ids 2-4), read from its utils.py without importing
    it: that module loads Hugging Face evaluate's code_eval from the hub at import."""
    tree = ast.parse((lm_eval_tasks_dir() / "mbpp" / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    return ast.literal_eval(fn.body[-1].value)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def fewshot(name: str) -> tuple[list[tuple[str, str]], str, list[str], str]:
    """(worked examples as (question, solution), query template, stop strings, the delimiter between a question
    and its solution) of lm-eval's task for `name`; `offline` is zero-shot in the training format of its train
    split (data.record_text); SQuAD is lm-eval squadv2's zero-shot prompt, answered up to the newline."""
    if name == "offline":
        return [], "Question: {q} Answer:", ["Question:"], " "
    if name == "squad":
        return [], "{q}", ["\n"], " "
    if name == "mbpp":
        return [(mbpp_text(r), r["code"] + "\n[DONE]") for r in mbpp_fewshot_records()], "{q}", ["[DONE]"], ""
    if BENCHMARKS[name].style == "gsm8k":
        import yaml

        cfg = yaml.safe_load((lm_eval_tasks_dir() / "gsm8k" / "gsm8k-cot.yaml").read_text())
        shots = [(s["question"], s["target"]) for s in cfg["fewshot_config"]["samples"]]
        return shots, "Q: {q}\nA:", cfg["generation_kwargs"]["until"], " "
    from lm_eval.tasks.minerva_math.utils import list_fewshot_samples

    shots = [(s["problem"], s["solution"]) for s in list_fewshot_samples()]
    return shots, "Problem:\n{q}\n\nSolution:", ["Problem:"], " "


def build_prompts(name: str, questions: list[str], tok, style: str) -> tuple[list[str], list[str]]:
    """(prompt texts, stop strings) exactly as lm-eval renders them: examples joined by "\\n\\n", each query then
    the target delimiter and its solution; --prompt chat: one user turn through the chat template."""
    if style == "chat":
        return [chat_prompt(tok, q + CHAT_SUFFIX) for q in questions], []
    shots, query, stop, delim = fewshot(name)
    head = "".join(query.format(q=q) + delim + a + "\n\n" for q, a in shots)
    return [head + query.format(q=q) for q in questions], stop


# ----------------------------------------------------------------------------- generation


def _cut(text: str, stop: list[str]) -> str:
    """Text before the first stop string (lm-eval's post-processing)."""
    for s in stop:
        if s and s in text:
            text = text.split(s)[0]
    return text


def encode(tok, text: str, add_bos: bool) -> list[int]:
    """Token ids of a prompt, with BOS in front if asked and the text does not already start with it."""
    return tok(text, add_special_tokens=add_bos and not text.startswith(tok.bos_token or "\0"))["input_ids"]


@torch.no_grad()
def gold_logprobs(model, tok, prompts: list[str], continuations: list[str], *, batch_size: int,
                  add_bos: bool) -> list[float]:
    """Teacher-forced mean log-probability of each continuation y after its prompt x:
    (1/|y|) sum_t log p(y_t | x, y_<t). A continuous score of how well a model still knows a worked solution:
    it moves with every weight, where greedy correctness is 0 or 1. Tokens are split as lm-eval splits them:
    x + y is encoded whole and y is what follows x's own encoding (a trailing space of x moves into y). The
    prefix that every prompt shares (few-shot examples) is run once and its KV cache reused."""
    starts = [len(encode(tok, p, add_bos)) for p in prompts]  # where each continuation begins in `whole`
    whole = [encode(tok, p + y, add_bos) for p, y in zip(prompts, continuations)]
    for i, (n, w) in enumerate(zip(starts, whole)):
        if len(w) <= n:
            raise ValueError(f"continuation #{i} ({continuations[i][:40]!r}) adds no tokens after its prompt")
    c = common_prefix([w[:n] for n, w in zip(starts, whole)])
    shared = prefix_cache(model, whole[0][:c])
    pad = pad_id(tok)
    dev, scores = next(model.parameters()).device, [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(whole[i]))
    while order:  # longest first; a batch holds about LOGPROB_TOKENS tokens (its logits are rows x tokens x vocab)
        rows = max(1, min(batch_size, LOGPROB_TOKENS // (len(whole[order[0]]) - c)))
        batch, order = order[:rows], order[rows:]
        S = max(len(whole[i]) - c for i in batch)
        x = torch.full((len(batch), S), pad, dtype=torch.long)  # [rest of the prompt][continuation][right padding]
        y = torch.full((len(batch), S), -100, dtype=torch.long)  # target at position t: the token at t + 1
        for b, i in enumerate(batch):
            rest, start = whole[i][c:], starts[i] - c  # y's first token sits at `start` of the rest
            x[b, : len(rest)] = torch.tensor(rest)
            y[b, start - 1 : len(rest) - 1] = torch.tensor(rest[start:])
        lo = int((y != -100).int().argmax(1).min())  # the earliest predicting position in the batch
        real = torch.arange(S) < torch.tensor([len(whole[i]) - c for i in batch])[:, None]  # (B, S)
        mask = torch.cat([torch.ones(len(batch), c, dtype=torch.long), real.long()], 1)  # (B, c + S)
        logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=True,
                       **{cache_arg(model): repeat_cache(shared, len(batch))},
                       logits_to_keep=torch.arange(lo, S, device=dev)).logits  # (B, S - lo, V)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[:, lo:].flatten().to(dev),
                                                ignore_index=-100, reduction="none").view(len(batch), -1)
        n = (y[:, lo:] != -100).sum(1)
        for b, i in enumerate(batch):
            scores[i] = -float(nll[b].sum().cpu()) / int(n[b])
    return scores


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int, stop: list[str], batch_size: int,
             add_bos: bool, reuse_prefix: bool = True) -> tuple[list[str], list[tuple[int, int]]]:
    """Greedy completions of `prompts`, cut at the first stop string -> (texts, (prompt, generated) lengths).

    The longest token prefix that all prompts share (the few-shot examples) is run once, so only the questions are
    prefilled; rows attend to its KV cache through fast.prefix_attention where the model allows, else each
    group of rows starts from a copy of it. Prompts enter longest first, `batch_size` at a time, and a finished
    row's slot is refilled with the next prompt (see fast.decode)."""
    if not prompts:
        return [], []
    dev = next(model.parameters()).device
    ids = [encode(tok, p, add_bos) for p in prompts]
    max_new_tokens = new_token_room(model, max(map(len, ids)), max_new_tokens)
    c = common_prefix(ids) if reuse_prefix else 0
    shared = prefix_cache(model, ids[0][:c])
    lead = 0 if shared is None or shares_prefix(model) else c  # prefix columns in each row's own cache
    pad = pad_id(tok)
    pending, entered = sorted(range(len(prompts)), key=lambda i: -len(ids[i])), []
    bar = tqdm(total=len(prompts), desc="generate", disable=not is_main(), leave=False)

    def rows(free: int):  # the next `free` prompts as [shared prefix if lead][left padding][rest of the prompt]
        if not pending:
            return None
        batch = [pending.pop(0) for _ in range(min(free, len(pending)))]
        S = max(len(ids[i]) - c for i in batch)
        x = torch.full((len(batch), lead + S), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for b, i in enumerate(batch):
            x[b, :lead], mask[b, :lead] = torch.tensor(ids[i][:lead], dtype=torch.long), 1
            x[b, lead + S - (len(ids[i]) - c) :] = torch.tensor(ids[i][c:])
            mask[b, lead + S - (len(ids[i]) - c) :] = 1
        entered.extend(batch)
        bar.update(len(batch))
        return x.to(dev), mask.to(dev), repeat_cache(shared, len(batch)) if lead else None, None

    new = decode(model, *rows(batch_size)[:3], max_new_tokens=max_new_tokens, eos=eos_ids(model, tok),
                 stop=[s for s in stop if s], tok=tok, refill=rows, prefix=None if lead else shared)
    bar.close()
    texts, lengths = [None] * len(prompts), [None] * len(prompts)
    for i, n in zip(entered, new):
        texts[i] = _cut(tok.decode(n, skip_special_tokens=True), stop)
        lengths[i] = (len(ids[i]), len(n))
    return texts, lengths


def new_token_room(model, longest: int, wanted: int) -> int:
    """`wanted` new tokens, or no more than the model's positions allow after the longest prompt (with a line). A
    prompt already past them (RoPE models run on, untrained there) gets at most as many new tokens as positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None or longest + wanted <= positions:
        return wanted
    room = positions - longest if longest < positions else min(wanted, positions)
    if room < wanted:
        print0(f"--max-new-tokens {wanted}: the model has {positions} positions and the longest prompt takes "
               f"{longest}; generating at most {room} tokens")
    return room


# ----------------------------------------------------------------------------- the two engines


def grade(style: str, texts: list[str], golds: list, cfg: "Config") -> tuple[list, list, list[float]]:
    """(predictions, correct per question: True / False / None for a grading timeout, F1 per question) of the
    generations. Math: the extracted answer against the gold one (math-verify). Code (MBPP pass@1, greedy): the
    generation run with the benchmark's asserts appended (passes_tests, in parallel). SQuAD: correct = exact
    match, and token F1."""
    if style == "code":
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            marks = list(pool.map(lambda tg: passes_tests(tg[0] + "\n" + tg[1], cfg.code_timeout), zip(texts, golds)))
        return texts, marks, [0.0] * len(texts)
    if style == "squad":
        preds = [t.strip() for t in texts]
        em_f1 = [squad_scores(p, g) for p, g in zip(preds, golds)]
        return preds, [em == 1.0 for em, _ in em_f1], [f for _, f in em_f1]
    preds = [extract_answer(t, style) for t in texts]
    return preds, [math_equal(p, g, cfg.verify_timeout) for p, g in zip(preds, golds)], [0.0] * len(texts)


def evaluate_builtin(model, tok, cfg: "Config") -> dict:
    """{task: metrics} with the builtin engine: --metrics accuracy (greedy generation, graded) and/or gold_logprob
    (teacher-forced, no generation). Under torchrun each rank takes every world-th question and the sums are
    all-reduced; every rank returns the same numbers (samples are rank 0's share)."""
    d = setup_dist(cfg.device)
    results = {}
    for name in cfg.task_list():
        mine = load_benchmark(name, cfg.data_dir, cfg.limit)[d.rank :: d.world]
        samples = [{"question": r.question, "gold": r.gold} for r in mine]  # filled in by each metric
        res = {"n": int(all_reduce_dict({"n": len(mine)}, d.device)["n"]), "engine": "builtin", "prompt": cfg.prompt}
        if "accuracy" in cfg.metric_list():
            res.update(accuracy_metrics(model, tok, name, mine, samples, cfg, d))
        if "gold_logprob" in cfg.metric_list():
            res.update(logprob_metrics(model, tok, name, mine, samples, cfg, d))
        results[name] = {**res, "samples": samples}
    return results


def accuracy_metrics(model, tok, name: str, rows: list[Row], samples: list[dict], cfg: "Config", d) -> dict:
    """Greedy generation and grading of this rank's `rows`; each sample gets its output, prediction and mark."""
    prompts, stop = build_prompts(name, [r.question for r in rows], tok, cfg.prompt)
    t0 = time.perf_counter()
    texts, lengths = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, stop=stop,
                              batch_size=cfg.batch_size, add_bos=cfg.add_bos and cfg.prompt != "chat")
    gen_s = time.perf_counter() - t0
    style = BENCHMARKS[name].style
    style = "boxed" if cfg.prompt == "chat" and style == "gsm8k" else style
    preds, marks, f1 = grade(style, texts, [r.gold for r in rows], cfg)
    for smp, t, p, m in zip(samples, texts, preds, marks):
        smp.update(output=t, pred=p, correct=m)
    n = all_reduce_dict({  # sums over ranks
        "questions": len(rows), "correct": sum(m is True for m in marks), "undecided": sum(m is None for m in marks),
        "no_answer": sum(p is None for p in preds), "tokens": sum(G for _, G in lengths), "gen_s": gen_s,
        "flops": sum(forward_flops(model.config, P + G) for P, G in lengths), "f1": sum(f1)}, d.device)
    q = n["questions"]
    return {"accuracy": n["correct"] / q, "correct": int(n["correct"]), "timeouts": int(n["undecided"]),
            "no_answer": int(n["no_answer"]), "gen_tokens": n["tokens"] / q, "flops_per_question": n["flops"] / q,
            "gen_tokens_per_s": n["tokens"] / (n["gen_s"] / d.world),
            **({"f1": n["f1"] / q} if style == "squad" else {})}


def logprob_metrics(model, tok, name: str, rows: list[Row], samples: list[dict], cfg: "Config", d) -> dict:
    """gold_logprobs of each row's reference solution, asked as the accuracy prompt asks it and written after the
    prompt's delimiter; the mean over the questions that have a reference (gold_logprob_n of them)."""
    have = [i for i, r in enumerate(rows) if r.reference]
    lp = []
    if have:
        prompts, _ = build_prompts(name, [rows[i].question for i in have], tok, cfg.prompt)
        delim = fewshot(name)[3] if cfg.prompt == "fewshot" else ""
        lp = gold_logprobs(model, tok, prompts, [delim + rows[i].reference for i in have], batch_size=cfg.batch_size,
                           add_bos=cfg.add_bos and cfg.prompt != "chat")
    for i, v in zip(have, lp):
        samples[i]["gold_logprob"] = v
    n = all_reduce_dict({"scored": len(have), "logprob": sum(lp)}, d.device)
    return {"gold_logprob": n["logprob"] / n["scored"] if n["scored"] else None, "gold_logprob_n": int(n["scored"])}


def lm_eval_task_yamls(names: list[str], data_dir: str, where: Path) -> list[str]:
    """Write task YAMLs into `where` that point lm-eval's own tasks at the local benchmark files (they include
    lm-eval's YAML and override only the data source); returns the task names to run."""
    import yaml

    base = lm_eval_tasks_dir()
    parent = {"gsm8k": base / "gsm8k" / "gsm8k-cot.yaml",
              "minerva_math": base / "minerva_math" / "minerva_math_algebra.yaml",
              "math500": base / "minerva_math" / "minerva_math500.yaml"}
    tasks = []
    for name in names:
        if not data_dir:  # lm-eval's own task and dataset, from the hub
            tasks.append(BENCHMARKS[name].lm_eval)
            continue
        path = benchmark_file(name, data_dir)
        spec = {"include": str(parent[name]), "task": f"ptl_{name}", "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test", "training_split": None}
        (where / f"ptl_{name}.yaml").write_text(yaml.safe_dump(spec))
        tasks.append(spec["task"])
    return tasks


def evaluate_lm_eval(model, tok, cfg: "Config") -> dict:
    """{task: metrics} through lm_eval.simple_evaluate on the in-memory model (HFLM). Accuracy is gsm8k_cot's
    flexible-extract exact match, or the minerva tasks' math_verify; all of lm-eval's metrics are kept."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if cfg.prompt != "fewshot" or cfg.metric_list() != ["accuracy"]:
        raise ValueError("--engine lm-eval runs lm-eval's few-shot tasks for accuracy; use --engine builtin for "
                         "--prompt chat or --metrics gold_logprob")
    names, extra = cfg.task_list(), cfg.extra_lm_eval_tasks()
    for name in names:
        if BENCHMARKS[name].style in ("code", "squad") or BENCHMARKS[name].lm_eval is None:
            raise ValueError(f"{name}: no lm-eval task here ({name} is generated here, or lm-eval's needs Hugging Face "
                             "evaluate's metrics from the hub); use --engine builtin")
    with tempfile.TemporaryDirectory() as where:
        tasks = lm_eval_task_yamls(names, cfg.data_dir, Path(where)) + extra
        paths = [where] + ([cfg.include_path] if cfg.include_path else [])
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, add_bos_token=cfg.add_bos,
                  max_gen_toks=cfg.max_new_tokens, device=str(next(model.parameters()).device))
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=tasks, limit=cfg.limit or None,
                              task_manager=TaskManager(include_path=paths), log_samples=True,
                              gen_kwargs={"max_gen_toks": cfg.max_new_tokens})
        secs = time.perf_counter() - t0
    results = {}
    for name, task in zip(names + extra, tasks):
        m = {k: float(v) for k, v in out["results"][task].items() if "," in k and "stderr" not in k}  # "metric,filter"
        acc = m.get("exact_match,flexible-extract", m.get("math_verify,none", next(iter(m.values()), math.nan)))
        docs = {}  # lm-eval logs one sample per (question, filter)
        for s in out["samples"][task]:
            d = docs.setdefault(s["doc_id"], {"question": s["doc"].get("question", s["doc"].get("problem")),
                                              "output": s["resps"][0][0], "filtered": {}})
            d["filtered"][s.get("filter", "none")] = s["filtered_resps"][0]
        samples = [docs[k] for k in sorted(docs)]
        results[name] = {"accuracy": acc, "n": len(samples), "metrics": m, "engine": "lm-eval", "time_s": secs,
                         "samples": samples}
    return results


def evaluate_model(model, tok, cfg: "Config") -> dict:
    """{task: metrics} of an in-memory model with cfg.engine (the entry point ptl.py uses every round)."""
    model.eval()
    if cfg.engine == "builtin":
        return evaluate_builtin(model, tok, cfg)
    if not is_main():  # HFLM on an object runs in one process: rank 0 evaluates, the others wait
        return {}
    return evaluate_lm_eval(model, tok, cfg)


# ----------------------------------------------------------------------------- speed


@torch.no_grad()
def measure_speed(models: dict, tok, prompt: str, *, batch: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Prefill latency and decode tokens/s of each model on the same batch, dtype and device; greedy, length
    pinned (min_new_tokens = max_new_tokens, so EOS cannot shorten a run); models alternated within every
    repeat (ptl_common.alternate); medians, and the spread of the repeats.
    -> {name: {"prefill_s", "decode_tokens_per_s", "prefill_spread", "total_spread"}}"""
    enc = tok([prompt] * batch, return_tensors="pt")
    x = {n: {k: v.to(next(m.parameters()).device) for k, v in enc.items()} for n, m in models.items()}
    prefill = alternate({n: (lambda n=n, m=m: m(**x[n], use_cache=True, logits_to_keep=1)) for n, m in models.items()},
                        repeats=repeats, warmup=warmup, desc="timing prefill")
    total = alternate({n: (lambda n=n, m=m: m.generate(**x[n], do_sample=False, min_new_tokens=new_tokens,
                                                       max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                                                       temperature=None, top_p=None, top_k=None))
                       for n, m in models.items()}, repeats=repeats, warmup=warmup, desc="timing decode")
    res = {}
    for n in models:
        pre, tot = statistics.median(prefill[n]), statistics.median(total[n])
        res[n] = {"prefill_s": pre, "decode_tokens_per_s": batch * (new_tokens - 1) / max(tot - pre, 1e-9),
                  "prefill_spread": spread(prefill[n]), "total_spread": spread(total[n])}
    return res


# ----------------------------------------------------------------------------- CLI


@dataclass
class Config:
    """Accuracy (GSM8K, Minerva Math, MATH-500, MBPP, SQuAD, offline), FLOPs, speedup, and the report of a PTL run."""
    model: str = flag(DEFAULT_MODEL, "smollm2-135m, a checkpoint dir or a hub name")
    compare: str = flag("", "further models, comma-separated (e.g. pruned ones): all evaluated; FLOP ratio and "
                            "speedup over --model, timed alternately")
    report: str = flag("", "a PTL run directory: write report.md, report.json and rounds.png there")
    tasks: str = flag("gsm8k", "comma-separated: gsm8k, minerva_math, math500, offline (held-out generated "
                               "arithmetic), mbpp, squad")
    metrics: str = flag("accuracy", "comma-separated: accuracy (greedy generation, graded), gold_logprob "
                                    "(teacher-forced mean log-probability of each question's reference solution; no "
                                    "generation)")
    data_dir: str = flag("", "local benchmark files in the layout of ../shared/data (empty: the hub)")
    engine: Literal["builtin", "lm-eval"] = flag("builtin", "builtin: batched greedy decoding (fast.decode); "
                                                            "lm-eval: lm_eval.simple_evaluate on the same model")
    prompt: Literal["fewshot", "chat"] = flag("fewshot", "lm-eval's few-shot prompts, or zero-shot R1-style through "
                                                         "the chat template")
    limit: int = flag(0, "first N questions of each benchmark (0: all)")
    max_new_tokens: int = flag(256, "lm-eval's default; the R1-style evaluator used 3000")
    batch_size: int = flag(16, "questions per generate batch")
    add_bos: bool = flag(True, "prepend BOS to few-shot prompts (the authors ran lm-eval with add_bos_token=True)")
    verify_timeout: float = flag(5.0, "seconds math-verify may take per answer (then wrong)")
    code_timeout: float = flag(10.0, "seconds a generated MBPP program may run with its tests")
    lm_eval_tasks: str = flag("", "further lm-eval tasks by name (engine lm-eval), e.g. your own with --include-path")
    include_path: str = flag("", "a directory of extra lm-eval task YAMLs")
    speed_batch: int = flag(1, "speedup: sequences per generate (authors: 1)")
    speed_new_tokens: int = flag(64, "speedup: generated tokens, pinned (authors: 64)")
    warmup: int = flag(3, "speed: untimed runs of each model first")
    repeats: int = flag(5, "speed: timed runs of each model (the median is reported)")
    out: str = flag("", "write the results (with every sample) to this JSON file")
    dtype: Literal["auto", "float32", "bfloat16"] = flag("auto", "weights while evaluating; auto: bf16 on CUDA, fp32 "
                                                                 "on CPU")
    device: str = flag("auto", "auto (CUDA if present), cpu, cuda, ...")

    def __post_init__(self):
        check_ranges(self, positive=("batch_size", "max_new_tokens", "verify_timeout", "code_timeout", "speed_batch",
                                     "speed_new_tokens", "repeats"), non_negative=("limit", "warmup"))
        if self.out and Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a directory: give the name of the JSON file to write")
        check_read(self, READS)
        self.task_list(), self.metric_list()  # unknown names are refused now, not after the first benchmark

    def task_list(self) -> list[str]:
        names = [t for t in self.tasks.split(",") if t]
        if not names and not self.extra_lm_eval_tasks() and not self.report:
            raise ValueError(f"--tasks {self.tasks!r} names no benchmark; choose from {sorted(BENCHMARKS)}")
        for t in names:
            if t not in BENCHMARKS:
                raise ValueError(f"--tasks: unknown benchmark {t!r}; choose from {sorted(BENCHMARKS)} "
                                 "(other lm-eval tasks: --engine lm-eval --lm-eval-tasks NAME)")
        return names

    def metric_list(self) -> list[str]:
        names = [m for m in self.metrics.split(",") if m]
        if not names or any(m not in METRICS for m in names):
            raise ValueError(f"--metrics {self.metrics!r}: choose one or more of {', '.join(METRICS)}")
        return names

    def extra_lm_eval_tasks(self) -> list[str]:
        return [t for t in self.lm_eval_tasks.split(",") if t]


# Flags that only some modes read (check_read): set in another mode, a flag is refused.
READS = {
    "lm_eval_tasks": (lambda c: c.engine == "lm-eval", "with --engine lm-eval"),
    "include_path": (lambda c: c.engine == "lm-eval", "with --engine lm-eval"),
    **{k: (lambda c: not c.report, "when evaluating models, not with --report") for k in ("compare", "tasks", "limit")},
}


def evaluate_with(model, tok, flags: str, device: str) -> dict:
    """evaluate_model's metrics under evaluate.py `flags` (e.g. ptl.py's --eval-flags), per-question samples left
    out."""
    res = evaluate_model(model, tok, replace(parse_config_of(flags, within="--eval-flags"), device=device))
    return {task: {k: v for k, v in r.items() if k != "samples"} for task, r in res.items()}


def parse_config_of(flags: str, within: str = "") -> "Config":
    """evaluate.py's Config from a string of its flags (ptl.py --eval-flags)."""
    import shlex

    return parse_config(Config, shlex.split(flags), within=within)


def main(cfg: Config) -> dict:
    if cfg.report:
        res = write_report(cfg.report)
        print(res["markdown"])
        print("wrote " + ", ".join(str(Path(cfg.report) / f) for f in ("report.md", "report.json", "rounds.png")))
        return res
    d = setup_dist(cfg.device)
    if cfg.engine == "lm-eval" and d.world > 1:
        raise ValueError("--engine lm-eval evaluates an in-memory model in one process: run it with python, not "
                         "torchrun")
    names = [cfg.model] + [c for c in cfg.compare.split(",") if c]
    if len(set(names)) < len(names):
        raise ValueError(f"--model and --compare name the same model twice ({names}): give each once")
    for name in cfg.task_list():  # every local benchmark file is read (and checked) before any model loads
        local = name == "offline" or cfg.data_dir
        if local and (n := len(load_benchmark(name, cfg.data_dir, cfg.limit))) < cfg.limit:
            print0(f"--limit {cfg.limit}: {name} {'gives at most' if name == 'offline' else 'has'} {n} questions; "
                   "evaluating all of them")
    models = {n: load_model(n, dtype=cfg.dtype, device=d.device) for n in names}
    tok = models[cfg.model][1]
    for n in names[1:]:  # the speed comparison feeds every model the same token ids
        if models[n][1].get_vocab() != tok.get_vocab():
            raise ValueError(f"--compare {n}: its tokenizer differs from --model {cfg.model}'s, so one prompt's token "
                             "ids mean other words to it; compare models of one tokenizer (a PTL run's rounds and "
                             "the model it started from)")
    res = {n: evaluate_model(m, t, cfg) for n, (m, t) in models.items()}
    for n, r in res.items():
        print0(summary_line(n, r))
    if len(names) > 1:  # every model against the first, timed alternately in one run (measure_speed)
        prompt = build_prompts((cfg.task_list() or ["gsm8k"])[0], ["What is 12 + 30?"], tok, cfg.prompt)[0][0]
        speed = measure_speed({n: m for n, (m, _) in models.items()}, tok, prompt, batch=cfg.speed_batch,
                              new_tokens=cfg.speed_new_tokens, warmup=cfg.warmup, repeats=cfg.repeats)
        base, res["speed"] = models[cfg.model][0], {}
        for n in names[1:]:
            m, s0, s1 = models[n][0], speed[cfg.model], speed[n]
            res["speed"][n] = {**s1, "flop_ratio_128": forward_flops(base.config, 128) / forward_flops(m.config, 128),
                               "params": count_params(m), "prefill_speedup": s0["prefill_s"] / s1["prefill_s"],
                               "decode_speedup": s1["decode_tokens_per_s"] / s0["decode_tokens_per_s"]}
            s = res["speed"][n]
            print0(f"{n} vs {cfg.model}: FLOP ratio {s['flop_ratio_128']:.3f}x (128 tokens) | prefill speedup "
                   f"{s['prefill_speedup']:.3f}x | decode speedup {s['decode_speedup']:.3f}x (batch {cfg.speed_batch}, "
                   f"{cfg.speed_new_tokens} new tokens, median of {cfg.repeats})")
        res["speed"][cfg.model] = {**speed[cfg.model], "params": count_params(base)}
        noisy = [f"{n}: {max(v['prefill_spread'], v['total_spread']):.0%}" for n, v in speed.items()
                 if max(v["prefill_spread"], v["total_spread"]) > 0.2]
        if noisy:
            print0(f"warning: timings varied by more than 20% between repeats ({', '.join(noisy)}): the machine is "
                   "busy, and the speedups are not to be trusted. Re-run on an idle machine, or with more --repeats")
    if cfg.out and is_main():
        atomic_write_json(cfg.out, {"config": asdict(cfg), **res})
    cleanup_dist()
    return res


if __name__ == "__main__":
    unshadow_evaluate()
    run_cli(main, Config)
