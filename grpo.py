"""Recovery by reinforcement learning (paper Section 2.2, Algorithm 1 line 10): GRPO, hand-written.

For every prompt, sample a group of G responses; reward each with 0.9 * accuracy + 0.1 * format; standardise
the rewards within the group to get each response's advantage; update the policy with the clipped surrogate
plus a k3 KL penalty to a frozen reference, averaged over every response token of the batch (DeepSeekMath
Section 4.1; clip ratios, dual clip and the KL estimator as in EasyR1/verl, the authors' RL framework).

Each default names its source (the paper, the authors' EasyR1 config, EasyR1's code) in --help; the choices made
here, and why: docs/recovery.md.

    python grpo.py --rollout-batch 8 --max-response-length 48 --max-steps 5 --out /tmp/grpo     # CPU, offline
    torchrun --nproc_per_node 8 grpo.py --model out/qwen/round_2 --data hiyouga/math12k --samples 1200 \\
        --max-response-length 3000 --epochs 15 --out out/qwen/round_2_rl
"""
from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import OfflineReasoning, chat_prompt, check_sources, last_boxed, load_qa, math_equal
from fast import Sampling, cache_arg, decode, positions, repeat_cache, returned_cache
from models import DEFAULT_MODEL, load_model
from ptl_common import (all_reduce_, all_reduce_dict, check_out, check_ranges, cleanup_dist, flag, run_cli, same_path,
                        setup_dist)
from trainer import end_step, finished, grad_sync, reload, resume, save_final, wrap

SUFFIX = (" You FIRST think about the reasoning process as an internal monologue and then provide the final "
          "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE "
          "put in \\boxed{}.")  # the authors' prompt suffix (EasyR1 format prompt)

# ----------------------------------------------------------------------------- equations (pure)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(r_g)) / (std(r_g) + eps) within each group g of `group_size` consecutive responses
    (DeepSeekMath Section 4.1.2, outcome supervision); unbiased std; a constant group gets exactly 0.
    NaN rewards (could not be computed) are left out of their group's statistics and get A = 0."""
    r = rewards.view(-1, group_size).double()
    ok = ~r.isnan()
    n = ok.sum(1, keepdim=True)
    mean = r.nan_to_num().sum(1, keepdim=True) / n.clamp(min=1)
    var = ((r - mean).nan_to_num() ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    lo, hi = r.nan_to_num(math.inf).amin(1, keepdim=True), r.nan_to_num(-math.inf).amax(1, keepdim=True)
    constant = (hi <= lo) | (n <= 1)  # min == max: exact, unlike comparing with a float mean
    A = torch.where(ok & ~constant, (r - mean) / (var.sqrt() + eps), 0.0)
    return A.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman, 2020),
    in fp32, with the log-ratio clamped to [-20, 20] and the result to [-10, 10] as verl's low_var_kl.
    Computed as expm1(d) - d: verl's exp(d) - d - 1 rounds exp(d) to 1 for tiny d and goes negative."""
    d = (ref_logp.float() - logp.float()).clamp(-20, 20)
    return (torch.expm1(d) - d).clamp(-10, 10)


def grpo_token_loss(logp, old_logp, ref_logp, adv, *, clip_low: float = 0.2, clip_high: float = 0.3,
                    dual_clip: float = 3.0, beta: float = 1e-2) -> torch.Tensor:
    """Per-token loss L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t, with
    rho_t = exp(logp_t - old_logp_t); for A < 0 the surrogate is also capped at dual_clip * |A| (verl's dual
    clip). logp, old_logp, ref_logp (B, T); adv (B,). Aggregate with a token mean over the whole batch.
    The log-ratio is clamped to [-20, 20] before exp, as verl does: past 88.7 exp overflows to inf, and although
    the clipped loss stays finite, its backward is inf * 0 = NaN."""
    A = adv[:, None]
    rho = torch.exp((logp - old_logp).clamp(-20, 20))
    pg = torch.maximum(-A * rho, -A * rho.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip:
        pg = torch.where(A < 0, torch.minimum(pg, -A * dual_clip), pg)
    return pg + beta * k3_kl(logp, ref_logp) if beta else pg


def completion_mask(ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after; a row without EOS (truncated) keeps
    every token. Built from positions, not from ids != pad, so it is right when pad == eos. ids (B, T)"""
    is_eos = torch.isin(ids, torch.as_tensor(eos_ids, device=ids.device).flatten())
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])  # (B,)
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).long()


def easyr1_normalise(text: str) -> str:
    """EasyR1's reward functions read the response with the spaces around <, > and / removed."""
    return re.sub(r"\s*(<|>|/)\s*", r"\1", text)


def format_reward(text: str) -> float:
    """EasyR1's math format: the normalised response (easyr1_normalise) fullmatches
    <think>.*</think>.*\\boxed{.*}.* (DOTALL) -> 1.0, else 0.0."""
    t = easyr1_normalise(text)
    return 1.0 if re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", t, re.DOTALL) else 0.0


def accuracy_reward(text: str, answer: str, timeout: float = 5.0, grader: str = "math-verify") -> float | None:
    """1.0 if the last \\boxed{} of the response equals the gold answer, 0.0 if it does not or there is no box.

    grader "math-verify" (default): equal as mathematics (\\frac12 == 0.5 == \\frac{2}{4}); None if it cannot be
    decided (the gold answer does not parse, or math-verify timed out): such a reward is skipped, never counted
    as 0. grader "mathruler": EasyR1's reward exactly (mathruler's grade_answer, stricter: \\frac{2}{4} is not
    1/2, 0.333333 is not 1/3, 2^{10} is not 1024), on the response with spaces around < > / removed as EasyR1
    does; like EasyR1 it scores 0 when sympy fails, and None only if grading outlives `timeout` seconds."""
    if grader == "mathruler":
        return mathruler_accuracy(text, answer, timeout)
    if grader != "math-verify":
        raise ValueError(f"unknown grader {grader!r}: use math-verify or mathruler")
    ok = math_equal(last_boxed(text, fbox=False), answer, timeout)
    return None if ok is None else float(ok)


def mathruler_accuracy(text: str, answer: str, timeout: float = 5.0) -> float | None:
    """EasyR1's examples/reward_function/math.py accuracy: grade_answer(extract_boxed_content(response), answer)
    from mathruler, after EasyR1's re.sub(r"\\s*(<|>|/)\\s*", r"\\1", response). mathruler has no time limit of
    its own (sympy.simplify can run for minutes), so an alarm of `timeout` seconds makes it None (skipped)."""
    import signal

    from mathruler.grader import extract_boxed_content, grade_answer

    def alarm(signum, frame):
        raise TimeoutError
    response = easyr1_normalise(text)
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(timeout)))
    try:
        return 1.0 if grade_answer(extract_boxed_content(response), answer) else 0.0
    except TimeoutError:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def math_reward(text: str, answer: str, *, acc_weight: float = 0.9, format_weight: float = 0.1,
                timeout: float = 5.0, grader: str = "math-verify") -> dict:
    """The authors' reward: 0.9 * accuracy + 0.1 * format, with its parts (reward NaN when skipped)."""
    acc, fmt = accuracy_reward(text, answer, timeout, grader), format_reward(text)
    return {"reward": math.nan if acc is None else acc_weight * acc + format_weight * fmt,
            "accuracy": math.nan if acc is None else acc, "format": fmt}


# ----------------------------------------------------------------------------- data and prompts


def render(tok, question: str, style: str) -> str:
    """The prompt text for `question` (see choice 5 of the module docstring)."""
    if style == "chat":
        return chat_prompt(tok, question.strip() + SUFFIX)
    demos = [OfflineReasoning(10**6, easy=True)[i] for i in range(3)]  # fixed worked examples, outside any split
    shots = "".join(f"Question: {d['question']} Answer: {d['answer']}{tok.eos_token}\n" for d in demos)
    return shots + f"Question: {question} Answer:"


# ----------------------------------------------------------------------------- rollouts and log-probs


@torch.no_grad()
def rollout(model, tok, prompts: list[str], cfg: "Config", seeds: list[int]) -> tuple[list, list]:
    """G sampled responses per prompt: (prompt ids, response ids up to and including the first EOS), G per
    prompt in order. Prompts go --gen-batch at a time (0: all at once), left-padded. The builtin engine
    prefills each prompt once and copies its KV cache to its G rows, and a row leaves the batch at its EOS;
    response g of prompt i draws with its own generator, seeded by (seeds[i], g), so it does not depend on the
    batch or rank it was made in. --rollout-engine hf calls transformers' generate, seeded once per call."""
    model.eval()
    P, R, G = [], [], cfg.group_size
    per_call = cfg.gen_batch or len(prompts)
    for s in range(0, len(prompts), per_call):
        enc = tok(prompts[s : s + per_call], return_tensors="pt", padding=True, truncation=True,
                  max_length=cfg.max_prompt_length, add_special_tokens=cfg.prompt != "chat",
                  padding_side="left").to(next(model.parameters()).device)
        x, mask = enc["input_ids"], enc["attention_mask"]
        if cfg.rollout_engine == "hf":
            torch.manual_seed(seeds[s])
            out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, max_new_tokens=cfg.max_response_length, num_return_sequences=G,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
            resp = out[:, x.shape[1]:]
            new = [resp[b, : n].tolist() for b, n in enumerate(completion_mask(resp, tok.eos_token_id).sum(1))]
        else:
            new = sample_groups(model, x, mask, seeds[s : s + per_call], cfg, eos={tok.eos_token_id})
        P += [p for i in range(len(x)) for p in [x[i][mask[i].bool()].tolist()] * G]  # each prompt's ids, G times
        R += new
    model.train()
    return P, R


def sample_groups(model, x: torch.Tensor, mask: torch.Tensor, seeds: list[int], cfg: "Config", eos: set) -> list:
    """G sampled continuations of each left-padded prompt x (B, T), mask (B, T): all but the last prompt token
    are prefilled once per prompt, the cache is repeated for its G rows, and decode samples on from there."""
    G, dev = cfg.group_size, x.device
    pos = positions(mask)
    cache = None
    if x.shape[1] > 1:
        cache = returned_cache(model(input_ids=x[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                                     use_cache=True, logits_to_keep=1))
    gens = [torch.Generator(dev).manual_seed(hash((s, g)) % 2**63) for s in seeds for g in range(G)]
    return decode(model, x.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), repeat_cache(cache, G, copy=False),
                  max_new_tokens=cfg.max_response_length, eos=eos,
                  sampling=Sampling(cfg.temperature, cfg.top_p, cfg.top_k), gens=gens)


def response_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float):
    """log pi(response token | everything before it) / temperature-scaled, as sampled. -> logp, mask (B, T)

    Rows that follow a row with the same prompt (a group) share one prefill of it: the KV cache of all but its
    last token is computed once per group and repeated for the group's rows (the gradient flows back through
    the repeat, summed over the rows), and each row then runs only [last prompt token, response[:-1]]. For G
    responses of R tokens to a P-token prompt that is P + G R positions instead of G (P + R). Prefixes are
    left-padded and responses right-padded; positions follow the real tokens (as in generate)."""
    dev = next(model.parameters()).device
    starts = [b for b in range(len(prompts)) if b == 0 or prompts[b] != prompts[b - 1]]
    counts = torch.tensor(starts[1:] + [len(prompts)]) - torch.tensor(starts)  # (groups,) rows per group
    x, head_mask = left_pad([prompts[b][:-1] for b in starts], pad_id)  # (groups, P - 1)
    cache = None
    if x.shape[1]:
        pos = positions(head_mask)
        cache = returned_cache(model(input_ids=x.to(dev), attention_mask=head_mask.to(dev), position_ids=pos.to(dev),
                                     use_cache=True, logits_to_keep=1))
        cache.batch_repeat_interleave(counts.to(dev))
    T = max(max(map(len, responses)), 1)
    ids, y = torch.full((len(prompts), T), pad_id, dtype=torch.long), torch.full((len(prompts), T), pad_id)
    mask = torch.zeros_like(ids)  # (B, T) 1 on response tokens
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : max(len(r), 1)] = torch.tensor(p[-1:] + r[:-1])
        y[b, : len(r)], mask[b, : len(r)] = torch.tensor(r, dtype=torch.long), 1
    attn = torch.cat([head_mask.repeat_interleave(counts, 0), mask], 1)  # inputs t < len(r) are real, and
    attn[:, x.shape[1]] = 1  # the last prompt token (input 0) is real even for an empty response
    pos = torch.tensor([len(p) - 1 for p in prompts])[:, None] + torch.arange(T)
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=False,
                   **{cache_arg(getattr(model, "module", model)): cache}).logits  # (B, T, V): t predicts token t
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    logp = -F.cross_entropy(logits.flatten(0, 1), y.flatten().to(dev), reduction="none")
    return logp.view(len(prompts), T), mask.to(dev)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids, mask (B, max length), left-padded."""
    n = max(map(len, rows))
    ids, mask = torch.full((len(rows), n), pad_id, dtype=torch.long), torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, n - len(r):], mask[b, n - len(r):] = torch.tensor(r), 1
    return ids, mask


# ----------------------------------------------------------------------------- the loop


@dataclass
class Config:
    """GRPO with format and accuracy rewards: PTL's RL recovery step (paper Section 2.2)."""
    model: str = flag(DEFAULT_MODEL, "smollm2-135m, a checkpoint dir or a hub name")
    data: str = flag("offline-easy", "offline-easy | .jsonl/.parquet (problem/answer, GSM8K) | hub (paper: "
                                     "hiyouga/math12k)")
    samples: int = flag(1200, "prompts in this run's slice ([released]: math12k in 10 parts of ~1.2k)")
    data_offset: int = flag(0, "first prompt of this run's slice of the shuffled data")
    out: str = flag("out/grpo", "final HF checkpoint, metrics.jsonl, checkpoints/")
    prompt: Literal["auto", "chat", "fewshot"] = flag("auto", "auto: fewshot for offline data, else chat")
    group_size: int = flag(8, "responses per prompt [paper]")
    temperature: float = flag(1.0, "[paper]")
    top_p: float = flag(0.99, "[released]; EasyR1 upstream 1.0")
    top_k: int = flag(0, "0 disables (transformers would fill in 50)")
    max_prompt_length: int = flag(2048, "[released]")
    max_response_length: int = flag(3000, "[released]; EasyR1 upstream 2048; tens on a CPU")
    rollout_batch: int = flag(128, "prompts per step, over all ranks [paper]; EasyR1 upstream 512")
    mini_batches: int = flag(1, "policy updates per rollout: rollout / global batch [paper: 128 / 128]; EasyR1 "
                                "upstream 512 / 128 = 4")
    micro_batch: int = flag(8, "responses per forward/backward on one rank")
    gen_batch: int = flag(0, "prompts per decoding batch (0: all of a rank's prompts; with --rollout-engine hf, "
                             "1 makes rollouts independent of world size)")
    rollout_engine: Literal["builtin", "hf"] = flag(
        "builtin", "builtin: fast.decode (one prefill per prompt, finished rows leave the batch, a generator "
                   "per response); hf: transformers' generate")
    lr: float = flag(1e-6, "constant [paper]")
    weight_decay: float = flag(1e-2, "[released]")
    max_grad_norm: float = flag(1.0, "[EasyR1 code]")
    kl_coef: float = flag(1e-2, "k3 KL loss coefficient [released]")
    clip_low: float = flag(0.2, "[EasyR1 code]")
    clip_high: float = flag(0.3, "[EasyR1 code]")
    dual_clip: float = flag(3.0, "[EasyR1 code]")
    acc_weight: float = flag(0.9, "[EasyR1 math reward: 1 - format weight]")
    format_weight: float = flag(0.1, "[EasyR1 math reward]")
    grader: Literal["math-verify", "mathruler"] = flag(
        "math-verify",
        "accuracy grader: math-verify (lenient; undecidable rewards skipped) or mathruler (EasyR1's exactly)")
    verify_timeout: float = flag(5.0, "seconds a grader may take; then the reward is skipped")
    epochs: int = flag(1, "passes over the prompts ([released]: 15)")
    max_steps: int = flag(0, "policy steps (0: epochs over the prompts)")
    save_every: int = flag(0, "steps between resumable checkpoints (0: none)")
    seed: int = flag(0, "which prompts are drawn, and the sampling")
    device: str = flag("auto", "auto (CUDA if present), cpu, cuda, ...")

    def __post_init__(self):
        check_ranges(self, positive=("rollout_batch", "mini_batches", "micro_batch", "max_prompt_length",
                                     "max_response_length", "temperature", "top_p", "lr", "epochs", "verify_timeout",
                                     "clip_high", "max_grad_norm"),
                     non_negative=("samples", "data_offset", "top_k", "gen_batch", "weight_decay", "kl_coef",
                                   "max_steps", "save_every", "acc_weight", "format_weight"))
        self.model = same_path(self.model)
        check_out(self.out, self.model)
        check_sources(self.data, "--data")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"--clip-low {self.clip_low}: the ratio is clipped to [1 - clip_low, 1 + clip_high]; "
                             "need 0 <= --clip-low < 1")
        if self.dual_clip <= 1:
            raise ValueError(f"--dual-clip {self.dual_clip}: it bounds negative-advantage losses at dual_clip x "
                             "advantage, above the clipped ratio; need > 1")
        if self.acc_weight + self.format_weight == 0:
            raise ValueError("--acc-weight and --format-weight are both 0: every reward would be 0")
        if self.lr > 1:
            raise ValueError(f"--lr {self.lr}: AdamW moves every weight by about lr per step; need <= 1")
        world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the ranks split a step's prompts
        chunks = math.ceil(self.rollout_batch // world * self.group_size / self.micro_batch)  # micro-batches a rank
        if chunks % self.mini_batches:
            raise ValueError(f"--mini-batches {self.mini_batches} must divide the {chunks} micro-batches of responses "
                             f"that each of {world} ranks trains on per step (--rollout-batch {self.rollout_batch} x "
                             f"--group-size {self.group_size} / --micro-batch {self.micro_batch}): else some updates "
                             "are smaller or empty")
        if self.top_p > 1:
            raise ValueError(f"--top-p {self.top_p}: a probability mass, at most 1")
        if self.group_size < 2:
            raise ValueError("--group-size must be >= 2: advantages compare responses within a group")


RESUMABLE = {"save_every", "device", "out"}  # may change when a run is resumed


def train(model, tok, rows: list[tuple[str, str]], cfg: Config, reward_fn: Callable | None = None) -> dict:
    """GRPO on (question, answer) rows; final weights to cfg.out as an HF checkpoint (resumes from cfg.out).

    reward_fn(response_text, answer) -> {"reward", ...} defaults to math_reward. Call on every rank with the
    same rows. Returns {"model": the trained model, "steps", "reward", "time_s", ...}."""
    d, out = setup_dist(cfg.device), Path(cfg.out)
    fingerprint = {"blocks": len(rows), "tokens": 0, "config": asdict(cfg)}
    if (done := finished(out, fingerprint, RESUMABLE)) is not None:
        return {**done, "model": reload(model, out, d)}
    style = cfg.prompt if cfg.prompt != "auto" else "fewshot" if cfg.data.startswith("offline") else "chat"
    reward_fn = reward_fn or (lambda text, answer: math_reward(
        text, answer, acc_weight=cfg.acc_weight, format_weight=cfg.format_weight, timeout=cfg.verify_timeout,
        grader=cfg.grader))
    N, B, W, G = len(rows), cfg.rollout_batch, d.world, cfg.group_size
    if B % (W * cfg.mini_batches) or N < B:
        raise ValueError(f"--rollout-batch {B} must be a multiple of {W} ranks x --mini-batches {cfg.mini_batches} "
                         f"and at most the {N} prompts")
    check_prompt_lengths(tok, [render(tok, q, style) for q, _ in rows], cfg)
    per_epoch = N // B
    total = cfg.max_steps or cfg.epochs * per_epoch
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef else None  # the policy as it starts
    net = wrap(model, d)  # DDP: each rank generates its own groups, so the policy is whole on every rank
    policy = net.module if hasattr(net, "module") else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start, elapsed = resume(out, net, opt, fingerprint, RESUMABLE)
    bar = tqdm(total=total, initial=start, desc="grpo", disable=not d.main, leave=False)
    t_start, row = time.time() - elapsed, {}
    for step in range(start, total):
        epoch, s = divmod(step, per_epoch)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[s * B : (s + 1) * B][d.rank * (B // W) : (d.rank + 1) * (B // W)].tolist()  # whole groups per rank
        t0 = time.perf_counter()
        prompts, responses = rollout(policy, tok, [render(tok, rows[i][0], style) for i in mine], cfg,
                                     [hash((cfg.seed, step, i)) % 2**62 for i in mine])
        t_gen = time.perf_counter() - t0
        scored = [reward_fn(t, rows[mine[k // G]][1])
                  for k, t in enumerate(tok.batch_decode(responses, skip_special_tokens=True))]
        rewards = torch.tensor([x["reward"] for x in scored], dtype=torch.float32)  # (B/W * G,)
        use = ~rewards.isnan()  # skipped responses: out of the loss
        update = train_step(net, policy, ref, opt, prompts, responses, group_advantages(rewards, G), use, cfg,
                            tok.pad_token_id, W)
        sums = rollout_sums(scored, rewards, responses, G)
        sums.update(gen_s=t_gen, train_s=time.perf_counter() - t0 - t_gen, step_s=time.perf_counter() - t0)
        row = step_metrics(step + 1, all_reduce_dict(sums, d.device), update, W, cfg.lr)
        end_step(out, row, progress_line(row, total), bar, step, total, cfg.save_every, net, opt, fingerprint, t_start)
    bar.close()
    summary = {"steps": total, "reward": row.get("reward", math.nan), "accuracy": row.get("accuracy", math.nan),
               "time_s": time.time() - t_start, "prompts": N, "world": W, "resumed_at": start, "prompt_style": style,
               "fingerprint": fingerprint}
    save_final(out, model, net, tok, summary)
    return {**summary, "model": model.eval()}


def check_prompt_lengths(tok, prompts: list[str], cfg: Config) -> None:
    """Refuse prompts longer than --max-prompt-length: the rollout would cut off their end, the question."""
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=cfg.prompt != "chat")["input_ids"]]
    over = sum(n > cfg.max_prompt_length for n in lengths)
    if over:
        raise ValueError(f"--max-prompt-length {cfg.max_prompt_length}: {over} of the {len(prompts)} prompts are "
                         f"longer (the longest: {max(lengths)} tokens) and would lose their end; raise it")


def rollout_sums(scored: list[dict], rewards: torch.Tensor, responses: list, G: int) -> dict:
    """This rank's sums for one step's metrics (all-reduced into step_metrics' `st`); rewards (n,) hold NaN where
    a response was skipped, in groups of G."""
    use = ~rewards.isnan()
    return {"reward": float(rewards.nansum()), "scored": float(use.sum()),
            "format": sum(x.get("format", 0) for x in scored),
            "accuracy": sum(x.get("accuracy", 0) for x in scored if not math.isnan(x["reward"])),
            "zero_std_groups": float((rewards.view(-1, G).nan_to_num().std(1) == 0).sum()),
            "groups": len(rewards) // G, "tokens": sum(map(len, responses)), "responses": len(responses)}


def step_metrics(step: int, st: dict, update: dict, W: int, lr: float) -> dict:
    """metrics.jsonl's row for one step: means from the sums over W ranks `st`, and the update's loss, KL and
    gradient norm; step_s, gen_s, train_s: seconds per rank for the step, its generation and its update."""
    return {"step": step, "reward": st["reward"] / max(st["scored"], 1),
            "accuracy": st["accuracy"] / max(st["scored"], 1), "format": st["format"] / st["responses"],
            "kl": update["kl"], "zero_std": st["zero_std_groups"] / st["groups"],
            "skipped": int(st["responses"] - st["scored"]), "response_len": st["tokens"] / st["responses"],
            "loss": update["loss"], "grad_norm": update["grad_norm"], "step_s": st["step_s"] / W,
            "gen_s": st["gen_s"] / W, "train_s": st["train_s"] / W,
            "gen_tokens_per_s": st["tokens"] / (st["gen_s"] / W),
            "train_tokens_per_s": st["tokens"] / (st["train_s"] / W), "lr": lr}


def progress_line(row: dict, total: int) -> str:
    return (f"step {row['step']}/{total} | reward {row['reward']:.3f} | acc {row['accuracy']:.3f} | format "
            f"{row['format']:.3f} | kl {row['kl']:.4f} | zero-std {row['zero_std']:.2f} | len "
            f"{row['response_len']:.1f} | gen tok/s {row['gen_tokens_per_s']:.0f} | train tok/s "
            f"{row['train_tokens_per_s']:.0f}")


def train_step(net, policy, ref, opt, prompts, responses, adv, use, cfg: Config, pad_id: int, W: int) -> dict:
    """One rollout's policy update(s): the global token mean of grpo_token_loss over all ranks' responses."""
    n, mb = len(responses), cfg.micro_batch
    chunks = [list(range(i, min(i + mb, n))) for i in range(0, n, mb)]
    with torch.no_grad():  # reference (and, with several updates per rollout, old) log-probs, before any update
        ref_lp = [response_logps(ref, [prompts[i] for i in c], [responses[i] for i in c], pad_id, cfg.temperature)[0]
                  if ref is not None else None for c in chunks]
        old_lp = [response_logps(policy, [prompts[i] for i in c], [responses[i] for i in c], pad_id, cfg.temperature)[0]
                  if cfg.mini_batches > 1 else None for c in chunks]
    per_update = math.ceil(len(chunks) / cfg.mini_batches)
    reported = {"loss": 0.0, "kl": 0.0}  # token means, averaged over the updates
    for u in range(cfg.mini_batches):
        loss_sum, kl_sum = 0.0, 0.0
        part = range(u * per_update, min((u + 1) * per_update, len(chunks)))
        tokens = torch.tensor(float(sum(len(responses[i]) for k in part for i in chunks[k] if use[i])))
        n_tok = all_reduce_(tokens.to(next(policy.parameters()).device)).clamp(min=1)
        for j, k in enumerate(part):
            c = chunks[k]
            with grad_sync(net, j == len(part) - 1):
                logp, mask = response_logps(net, [prompts[i] for i in c], [responses[i] for i in c], pad_id,
                                            cfg.temperature)
                mask = mask * use[c][:, None].to(mask.device)
                old = old_lp[k] if old_lp[k] is not None else logp.detach()
                ref_logp = ref_lp[k] if ref is not None else logp.detach()
                loss = grpo_token_loss(logp, old, ref_logp, adv[c].to(logp.device), clip_low=cfg.clip_low,
                                       clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                       beta=cfg.kl_coef if ref is not None else 0.0)
                # DDP averages gradients over ranks: x W makes the update sum(token losses) / n_tok exactly.
                ((loss * mask).sum() * W / n_tok).backward()
            loss_sum += float((loss.detach() * mask).sum())
            if ref is not None:
                kl_sum += float((k3_kl(logp.detach(), ref_lp[k]) * mask).sum())
        sums = all_reduce_dict({"loss": loss_sum, "kl": kl_sum}, n_tok.device)
        total = {k: v / float(n_tok) for k, v in sums.items()}
        if not all(math.isfinite(x) for x in total.values()):
            raise FloatingPointError(f"GRPO loss is {total['loss']}; stopping before the update. Try a lower --lr.")
        gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        reported = {k: reported[k] + total[k] / cfg.mini_batches for k in reported}
    return {**reported, "grad_norm": gnorm}


def main(cfg: Config) -> dict:
    d = setup_dist(cfg.device)
    model, tok = load_model(cfg.model, dtype="float32", device=d.device)
    rows = load_qa(cfg.data, n=cfg.samples, seed=cfg.seed, offset=cfg.data_offset)
    result = train(model, tok, rows, cfg)
    cleanup_dist()
    return {k: v for k, v in result.items() if k != "model"}


if __name__ == "__main__":
    run_cli(main, Config)
