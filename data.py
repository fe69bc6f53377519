"""Reasoning data: text sources (files, hub datasets, the offline generator), answer extraction and grading, prompts,
and token batches.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
import typing
from pathlib import Path

import torch

import models

# ----------------------------------------------------------------------------- data

# Field pairs read as a reasoning sequence (question + chain-of-thought answer), in order of preference:
# GSM8K / reasoning-gym, MATH / NuminaMath-CoT, MetaMathQA, Alpaca-style instruction data.
QA_FIELDS = (("question", "answer"), ("problem", "solution"), ("query", "response"), ("instruction", "output"))


def record_text(rec: dict, where: str) -> str:
    """The paper's reasoning sequence: "Question: q Answer: a", or a record's own `text` (`content`: StarCoder).
    A field of the right name that holds no text (a number, a list, an empty string) is named as the problem."""
    for k in ("text", "content"):
        if k in rec:
            return text_field(rec, k, where)
    for q, a in QA_FIELDS:
        if q in rec and a in rec:
            return f"Question: {text_field(rec, q, where)} Answer: {text_field(rec, a, where)}"
    raise ValueError(
        f"{where}: record has fields {sorted(rec)}; expected `text`, `content` or one of "
        + ", ".join(f"{q}/{a}" for q, a in QA_FIELDS)
    )


def text_field(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: field `{key}` is {type(v).__name__} {str(v)[:40]!r}, not text")
    if not v.strip():
        raise ValueError(f"{where}: field `{key}` is empty; remove the record or fill it in")
    return v


def text_lines(path: str | Path):
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 (a binary file) raises with its number."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "give a text file (JSON lines, or one document per line)") from None


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """[(\"file:line\", record)] from a JSON-lines file; a malformed line raises with its line number."""
    rows = []
    for i, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        rows.append((f"{path}:{i}", rec))
    if not rows:
        raise ValueError(f"{path} is empty: it holds no records")
    return rows


FILE_FORMATS = (".jsonl", ".json", ".parquet", ".txt")  # the local files _source_rows reads


def check_sources(spec: str, flag: str) -> None:
    """Refuse now, before any model loads, a local data file of `spec` (comma-separated sources) that is missing."""
    for src in (s.strip() for s in spec.split(",") if s.strip()):
        if Path(src).expanduser().suffix in FILE_FORMATS and not Path(src).expanduser().is_file():
            raise ValueError(f"{flag} {src}: no such file")


def _source_rows(src: str, seed: int, split: str, check) -> typing.Sequence:
    """(where, record) rows of one source: `offline`, a local .jsonl/.json/.parquet/.txt file, or a hub
    dataset `name[:config]`. Large sources stay lazy: rows are built only when sampled."""
    if src in ("offline", "offline-easy"):
        return _Rows(OfflineReasoning(seed, easy=src == "offline-easy"), src)
    p = Path(src).expanduser()
    if p.suffix in (".jsonl", ".json"):
        rows = read_jsonl(p)
        for where, rec in rows:  # in memory anyway: report a bad record wherever it is, not only if sampled
            check(rec, where)
        return rows
    if p.suffix == ".txt":  # plain text, one document per line (e.g. a general-English corpus)
        lines = [(f"{p}:{i}", {"text": s.strip()}) for i, s in text_lines(p) if s.strip()]
        if not lines:
            raise ValueError(f"{p} is empty: it holds no text lines")
        return lines
    import datasets

    if p.suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(p))
        if len(ds) == 0:
            raise ValueError(f"{p} is empty: it holds no records")
        return _Rows(ds, str(p))
    if p.exists():
        raise ValueError(f"{p}: unknown data format; use {', '.join(FILE_FORMATS)}")
    # "Salesforce/wikitext:wikitext-103-raw-v1" names a config; "bigcode/starcoderdata:data_dir=python" a subfolder
    name, _, config = src.partition(":")
    kw = {"data_dir": config.partition("=")[2]} if config.startswith("data_dir=") else {"name": config or None}
    if models.hub_unreachable():
        raise FileNotFoundError(f"{src!r} is not a local file, and the Hugging Face hub, where it would be a dataset, "
                                "cannot be reached. Offline, use `offline` or a local .jsonl/.parquet file (or set "
                                "HF_HUB_OFFLINE=1 to read the datasets cache).")
    try:
        return _Rows(datasets.load_dataset(name, split=split, **kw), src)
    except Exception as e:  # noqa: BLE001  any hub failure: offline, typo, gated
        raise FileNotFoundError(
            f"Could not load dataset {src!r} ({type(e).__name__}: {e}). It is not a local file, and the hub "
            "could not provide it. Offline, use `offline` or a local .jsonl/.parquet file."
        ) from e


class _Rows(typing.Sequence):
    """Lazy (where, record) view of an indexable dataset: sampling n rows never builds the others."""

    def __init__(self, rows, name):
        self.rows, self.name = rows, name

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return f"{self.name}[{i}]", self.rows[i]


def load_texts(spec: str, *, n: int, seed: int, offset: int = 0, split: str = "train") -> list[str]:
    """load_rows as the paper's reasoning sequences "Question: q Answer: a" (see record_text)."""
    return [record_text(rec, where) for where, rec in load_rows(spec, n=n, seed=seed, offset=offset, split=split)]


def load_qa(spec: str, *, n: int, seed: int, offset: int = 0) -> list[tuple[str, str]]:
    """load_rows as (question, gold answer) pairs, each row checked (see question_answer): GRPO's prompts."""
    return [question_answer(rec, where) for where, rec in load_rows(spec, n=n, seed=seed, offset=offset,
                                                                     check=question_answer)]


def load_rows(spec: str, *, n: int, seed: int, offset: int = 0, split: str = "train", check=record_text) -> list:
    """(where, record) rows offset .. offset+n of one seeded permutation of the union of comma-separated sources.

    Sources: `offline` / `offline-easy` (generated, no network), local .jsonl/.json/.parquet/.txt files, hub
    dataset names (the paper's corpus: `AI-MO/NuminaMath-CoT,meta-math/MetaMathQA`). Slices at different
    offsets never overlap, which is how PTL gives each round its own data. n = 0 takes every row from offset
    on. `check(record, where)` validates local files in full and every returned row (raising on bad ones)."""
    sources = [_source_rows(s.strip(), seed, split, check) for s in spec.split(",") if s.strip()]
    if not sources:
        raise ValueError("no data source given")
    ends = list(itertools.accumulate(len(rows) for rows in sources))
    if not n and any(getattr(rows, "name", "").startswith("offline") for rows in sources):
        raise ValueError("offline data is generated without end: give the number of texts to use")
    n = n or ends[-1] - offset
    if offset + n > ends[-1]:
        raise ValueError(f"rows {offset}..{offset + n} were asked of {spec!r}, which holds {ends[-1]}: "
                         "use fewer texts per round or more data")
    perm = torch.randperm(ends[-1], generator=torch.Generator().manual_seed(seed))[offset : offset + n].tolist()
    rows = []
    for g in perm:
        si = bisect.bisect_right(ends, g)
        where, rec = sources[si][g - (ends[si - 1] if si else 0)]
        check(rec, where)
        rows.append((where, rec))
    return rows


# ----------------------------------------------------------------------------- answers and grading
# Shared by evaluation (evaluate.py) and rewards (grpo.py), so that neither depends on the other.


def last_boxed(text: str, fbox: bool = True) -> str | None:
    """The content of the last brace-balanced \\boxed{...} (or, with fbox, \\fbox{...}) in text, else None.
    Evaluation reads \\fbox as lm-eval's MATH graders do; rewards read \\boxed only, as EasyR1's format rule
    and its grader (mathruler) do, so that a response is never accurate without being formatted."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{") if fbox else -1)
    if start < 0:
        return None
    i, depth = text.index("{", start), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: an unfinished box is no answer


def math_equal(pred: str | None, gold: str, timeout: float = 5.0) -> bool | None:
    """pred == gold as mathematics (math-verify: 0.5 == \\frac12 == \\frac{2}{4}, 1,000 == 1000), or None when it
    cannot be decided: the gold answer does not parse, sympy fails on the comparison, or math-verify times out.
    The caller reports None (evaluation counts it wrong, a reward is skipped), never silently. No prediction, or
    one that does not parse, is wrong."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if pred is not None and pred.strip() == gold.strip():
        return True
    t = max(1, int(timeout))  # whole seconds: a float makes math-verify's alarm return nothing
    try:  # raise_on_error: by default math-verify turns a timeout into "wrong", the silent 0 we refuse
        g = parse(f"${gold}$", parsing_timeout=t, raise_on_error=True)
        if not g:
            return None
        if pred is None:
            return False
        return bool(verify(g, parse(f"${pred}$", parsing_timeout=t), timeout_seconds=t, raise_on_error=True))
    except TimeoutException:
        return None
    except Exception:  # noqa: BLE001  sympy failed on the gold answer or the comparison: undecidable
        return None


def question_answer(rec: dict, where: str) -> tuple[str, str]:
    """(question, gold answer) of a record: problem/question + answer (GSM8K's "... #### N" -> N), offline's
    `final`, or the last \\boxed{} of a MATH-style solution."""
    q = next((rec[k] for k in ("problem", "question", "query") if isinstance(rec.get(k), str)), None)
    a = rec.get("final", rec.get("answer"))
    if isinstance(a, (int, float)):
        a = str(a)
    if isinstance(a, str) and "####" in a:
        a = a.split("####")[-1].strip().replace(",", "")
    if a is None and isinstance(rec.get("solution"), str):
        a = last_boxed(rec["solution"])
    if q is None or not q.strip() or not a:
        raise ValueError(f"{where}: record has fields {sorted(rec)}; a graded problem needs a non-empty question "
                         "(problem/question) and a gold answer (answer, or a solution with \\boxed{})")
    return q, a


def chat_prompt(tok, content: str) -> str:
    """One user turn through the tokenizer's chat template, with the assistant's turn opened."""
    if not tok.chat_template:
        raise ValueError("--prompt chat needs a tokenizer with a chat template; use --prompt fewshot")
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def held_out(question: str) -> bool:
    """Whether an offline problem belongs to the held-out test split: 1 problem in 16, by a stable hash of its
    text. A split by content, not by index or seed: reasoning-gym seeds item i with seed + i, so two seeds
    share almost every item, and a small problem ("3 + 4 =") recurs at many indices."""
    return hashlib.sha1(question.encode()).digest()[0] < 16


class OfflineReasoning(typing.Sequence):
    """Arithmetic problems with a step-by-step answer, made offline from reasoning-gym generators.

    Even items are `chain_sum` (a +- b +- c ...), odd items `leg_counting` (animals x legs, then a sum);
    `easy` gives only one-digit a +- b, a task a 135M model can earn GRPO reward on. The chain of thought is
    derived from each item's metadata, in the format GRPO rewards: "<think>steps</think> The answer is
    \\boxed{N}.", so continual pre-training on it and GRPO on it form one pipeline.

    split="train" (every training and calibration use) never yields a `held_out` problem: item i is a pure
    function of (seed, i), redrawn from index i + SIZE, i + 2 SIZE, ... while it is held out, so any slice is
    drawn without building the rest. split="test" is the held-out problems in generator order (evaluate.py's
    `offline` benchmark): no problem of it appears in any training data, under any seed."""
    SIZE = 1_000_000

    def __init__(self, seed: int, easy: bool = False, split: typing.Literal["train", "test"] = "train"):
        import reasoning_gym as rg
        from reasoning_gym.arithmetic.leg_counting import ANIMALS

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        half, self.easy, self.split, self._test = self.SIZE // 2, easy, split, []
        self.legs_per = ANIMALS
        terms, digits = (2, 1) if easy else (5, 3)
        self.sums = rg.create_dataset("chain_sum", size=self.SIZE if easy else half, seed=seed, min_terms=2,
                                      max_terms=terms, max_digits=digits)
        self.legs = rg.create_dataset("leg_counting", size=half, seed=seed + 1, max_animals=5, max_instances=12)

    def __len__(self):
        return self.SIZE

    def __getitem__(self, i: int) -> dict:
        if self.split == "test":
            g = (self._test[-1] + 1) if self._test else 0
            while len(self._test) <= i:  # scan the generator for held-out problems (1 in 16)
                if held_out(self._item(g)["question"]):
                    self._test.append(g)
                g += 1
            return self._item(self._test[i])
        item = self._item(i)
        while held_out(item["question"]):
            i += self.SIZE
            item = self._item(i)
        return item

    def _item(self, i: int) -> dict:
        legs = i % 2 == 1 and not self.easy
        item = self.legs[i // 2] if legs else self.sums[i if self.easy else i // 2]
        m, steps = item["metadata"], []
        if not legs:  # left to right, one operation per step
            tok = m["expression"].split()
            acc = int(tok[0])
            for op, b in zip(tok[1::2], tok[2::2]):
                new = acc + int(b) if op == "+" else acc - int(b)
                steps.append(f"{acc} {op} {b} = {new}.")
                acc = new
        else:
            counts = []
            for animal, c in m["animals"].items():
                legs = self.legs_per[animal]
                steps.append(f"Each {animal} has {legs} legs, so {c} {animal}{'s' if c > 1 else ''} "
                             f"{'have' if c > 1 else 'has'} {c} * {legs} = {c * legs} legs.")
                counts.append(c * legs)
            steps.append(f"In total: {' + '.join(map(str, counts))} = {sum(counts)} legs.")
        q = re.sub(r"^Your task is.*?\n\nNow, h", "H", item["question"], flags=re.S).strip()
        cot = f"<think>{' '.join(steps)}</think> The answer is \\boxed{{{item['answer']}}}."
        return {"question": q, "answer": cot, "final": item["answer"]}


def offline_reasoning(n: int, seed: int) -> list[dict]:
    """The first n items of OfflineReasoning(seed)."""
    ds = OfflineReasoning(seed)
    return [ds[i] for i in range(n)]


def pad_id(tok) -> int:
    """The tokenizer's pad id, or its EOS id where it has none (load_model sets pad = EOS then, as HF does)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def make_batches(tokenizer, texts: list[str], *, max_length: int, batch_size: int) -> list[dict]:
    """Right-padded batches of {input_ids, attention_mask} (B, T), longest first.

    Right padding keeps each real token at the position it has unpadded, so scores do not depend on
    batching; sorting by length keeps padding (wasted compute) small."""
    if not texts:
        raise ValueError("no texts to batch")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        raise ValueError(f"text #{empty[0]} ({texts[empty[0]]!r}) has no tokens; remove empty records from the data")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = pad_id(tokenizer)
    batches = []
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        T = len(rows[0])
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        batches.append({"input_ids": x, "attention_mask": mask})
    return batches


def calibration_texts(cfg, tok, d):
    """calibration(t) -> (calibration batches, --protect-data batches or None) of round t: this rank's share of
    rows (t-1)n .. tn with --calib-per-round, else rows 0 .. n every round (built once); calibration.rows(t)."""
    cache: dict = {}

    def shard(spec: str, n: int, t: int) -> list[dict]:  # each rank scores its own batches; score_pass combines them
        texts = load_texts(spec, n=n, seed=cfg.seed, offset=(t - 1) * n)
        return make_batches(tok, texts, max_length=cfg.max_length, batch_size=cfg.batch_size)[d.rank :: d.world]

    def calibration(t: int) -> tuple[list, list | None]:
        t = t if cfg.calib_per_round else 1
        if t not in cache:
            cache.clear()
            cache[t] = (shard(cfg.calib_data, cfg.calib_samples, t),
                        shard(cfg.protect_data, cfg.protect_samples, t) if cfg.protect_data else None)
        return cache[t]

    def rows(t: int) -> list[int]:
        t = t if cfg.calib_per_round else 1
        return [(t - 1) * cfg.calib_samples, t * cfg.calib_samples]

    def check(last: int | None) -> None:  # the last round's rows exist: refused now, not after the earlier rounds
        if cfg.calib_per_round and last:
            load_rows(cfg.calib_data, n=cfg.calib_samples, seed=cfg.seed, offset=(last - 1) * cfg.calib_samples)
            if cfg.protect_data:
                load_rows(cfg.protect_data, n=cfg.protect_samples, seed=cfg.seed,
                          offset=(last - 1) * cfg.protect_samples)

    calibration.rows, calibration.check = rows, check
    return calibration
