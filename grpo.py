"""Recovery by reinforcement learning (paper Section 2.2, Algorithm 1 line 10): GRPO, hand-written.

For every prompt, sample a group of G responses; reward each with 0.9 * accuracy + 0.1 * format; standardise
the rewards within the group to get each response's advantage; update the policy with the clipped surrogate
plus a k3 KL penalty to a frozen reference, averaged over every response token of the batch (DeepSeekMath
Section 4.1; clip ratios, dual clip and the KL estimator as in EasyR1/verl, the authors' RL framework).

Choices (defaults are the authors' EasyR1 examples/config.yaml: n 8, temperature 1.0, top_p 0.99, lr 1e-6
constant, weight decay 1e-2, KL coef 1e-2, clip 0.2 / 0.3, dual clip 3, rollout = global batch = 128 prompts):
1. One policy update per rollout batch, so the ratio is 1 at the update and clipping never binds;
   --mini-batches k splits a rollout into k updates, with old log-probs taken before the first.
2. Loss aggregation: the global token mean (sum of token losses / all-reduced count of response tokens),
   verl's "token-mean", the authors' setting; not the original GRPO's mean of per-response means.
3. Advantages use the unbiased std (as verl and TRL) and eps 1e-6; a constant group gets exactly 0.
4. A prompt's whole group is generated and scored on one rank, so group statistics need no all-gather.
   Sampling is seeded per generate call. By default one call samples all of a rank's prompts (1.7x faster
   generation than one call per prompt on SmolLM2, scripts/bench_grpo.py); with --gen-batch 1 each prompt is
   its own call, seeded per (seed, step, prompt), so rollouts do not depend on the world size.
5. --prompt chat is the authors' prompt: one user turn through the chat template, with their suffix.
   --prompt fewshot is "Question: q Answer:" after three worked examples that end in EOS. `auto` takes
   fewshot for offline data: on SmolLM2-135M at temperature 1 the chat prompt gave 0/64 formatted answers to
   one-digit sums, the few-shot prompt 41/64 (14 correct), and 84% of responses stopped by themselves.
6. A reward that cannot be computed (a gold answer math-verify cannot parse, a timeout) is never a silent 0:
   the response leaves its group's statistics and the loss, and the step reports it as `skipped`.

    python grpo.py --rollout-batch 8 --max-response-length 48 --max-steps 5 --out /tmp/grpo     # CPU, offline
    torchrun --nproc_per_node 8 grpo.py --model out/qwen/round_2 --data hiyouga/math12k --samples 1200 \\
        --max-response-length 3000 --epochs 15 --out out/qwen/round_2_rl
"""
from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ptl_common import (DEFAULT_MODEL, OfflineReasoning, all_reduce_, cleanup_dist, load_model, load_rows,
                        parse_config, setup_dist)
from recover import grad_sync, reload, resume, save_final, save_state, wrap

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
    clip). logp, old_logp, ref_logp (B, T); adv (B,). Aggregate with a token mean over the whole batch."""
    A = adv[:, None]
    rho = torch.exp(logp - old_logp)
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


def last_boxed(text: str) -> str | None:
    """The content of the last brace-balanced \\boxed{...} (or \\fbox{...}) in text, else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i, depth = text.index("{", start), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: an unfinished box is no answer


def format_reward(text: str) -> float:
    """EasyR1's math format: with spaces around <, > and / removed, the response fullmatches
    <think>.*</think>.*\\boxed{.*}.* (DOTALL) -> 1.0, else 0.0."""
    t = re.sub(r"\s*(<|>|/)\s*", r"\1", text)
    return 1.0 if re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", t, re.DOTALL) else 0.0


def accuracy_reward(text: str, answer: str, timeout: float = 5.0) -> float | None:
    """1.0 if the last \\boxed{} of the response equals the gold answer under math-verify (\\frac12 == 0.5 ==
    \\frac{2}{4}), 0.0 if it does not or there is no box; None if it cannot be decided (the gold answer
    does not parse, or math-verify timed out): such a reward is skipped, never counted as 0."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    t = max(1, int(timeout))  # math-verify's alarm takes whole seconds (a float makes parse return [])
    try:  # raise_on_error: by default math-verify turns a timeout into "wrong", the silent 0 we refuse
        gold = parse(f"${answer}$", parsing_timeout=t, raise_on_error=True)
        pred = last_boxed(text)
        if not gold or pred is None:
            return None if not gold else 0.0
        return 1.0 if verify(gold, parse(f"${pred}$", parsing_timeout=t), timeout_seconds=t, raise_on_error=True) else 0.0
    except TimeoutException:
        return None
    except Exception:  # noqa: BLE001  sympy failed on the gold answer or the comparison: undecidable, skip
        return None


def math_reward(text: str, answer: str, *, acc_weight: float = 0.9, format_weight: float = 0.1,
                timeout: float = 5.0) -> dict:
    """The authors' reward: 0.9 * accuracy + 0.1 * format, with its parts (reward NaN when skipped)."""
    acc, fmt = accuracy_reward(text, answer, timeout), format_reward(text)
    return {"reward": math.nan if acc is None else acc_weight * acc + format_weight * fmt,
            "accuracy": math.nan if acc is None else acc, "format": fmt}


# ----------------------------------------------------------------------------- data and prompts


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
    if q is None or not a:
        raise ValueError(f"{where}: record has fields {sorted(rec)}; GRPO needs a question (problem/question) and "
                         "a gold answer (answer, or a solution with \\boxed{})")
    return q, a


def render(tok, question: str, style: str) -> str:
    """The prompt text for `question` (see choice 5 of the module docstring)."""
    if style == "chat":
        if not tok.chat_template:
            raise ValueError("--prompt chat needs a tokenizer with a chat template; use --prompt fewshot")
        return tok.apply_chat_template([{"role": "user", "content": question + SUFFIX}], tokenize=False,
                                       add_generation_prompt=True)
    demos = [OfflineReasoning(10**6, easy=True)[i] for i in range(3)]  # fixed worked examples, outside any split
    shots = "".join(f"Question: {d['question']} Answer: {d['answer']}{tok.eos_token}\n" for d in demos)
    return shots + f"Question: {question} Answer:"


# ----------------------------------------------------------------------------- rollouts and log-probs


@torch.no_grad()
def rollout(model, tok, prompts: list[str], cfg: "Config", seeds: list[int]) -> tuple[list, list]:
    """G sampled responses per prompt: (prompt ids, response ids up to and including the first EOS), G per
    prompt in order. Each generate call is seeded, with every sampling parameter passed explicitly."""
    model.eval()
    P, R = [], []
    per_call = cfg.gen_batch or len(prompts)
    for s in range(0, len(prompts), per_call):
        torch.manual_seed(seeds[s])
        enc = tok(prompts[s : s + per_call], return_tensors="pt", padding=True, truncation=True,
                  max_length=cfg.max_prompt_length, add_special_tokens=cfg.prompt != "chat",
                  padding_side="left").to(next(model.parameters()).device)
        out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             max_new_tokens=cfg.max_response_length, num_return_sequences=cfg.group_size,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        resp = out[:, enc["input_ids"].shape[1]:]
        keep = completion_mask(resp, tok.eos_token_id).sum(1).tolist()
        for b in range(len(out)):
            p = enc["input_ids"][b // cfg.group_size][enc["attention_mask"][b // cfg.group_size].bool()]
            P.append(p.tolist())
            R.append(resp[b, : keep[b]].tolist())
    model.train()
    return P, R


def response_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float):
    """log pi(response token | everything before it) / temperature-scaled, as sampled. -> logp, mask (B, T)
    Prompts are left-padded and responses right-padded; positions follow the real tokens (as in generate)."""
    Pn, T = max(map(len, prompts)), max(max(map(len, responses)), 1)
    dev = next(model.parameters()).device
    ids = torch.full((len(prompts), Pn + T), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, Pn - len(p) : Pn + len(r)] = torch.tensor(p + r)
        attn[b, Pn - len(p) : Pn + len(r)] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    # Only the last T + 1 positions' logits are needed: they predict the T response tokens.
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False).logits
    y = ids[:, Pn:]
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float() / temperature, y.flatten(), reduction="none")
    return logp.view(len(prompts), T), attn[:, Pn:]


# ----------------------------------------------------------------------------- the loop


@dataclass
class Config:
    """GRPO with format and accuracy rewards: PTL's RL recovery step (paper Section 2.2)."""
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "smollm2-135m, a checkpoint dir or a hub name"})
    data: str = field(default="offline-easy", metadata={"help": "offline-easy | .jsonl/.parquet (problem/answer, GSM8K) | hub (paper: hiyouga/math12k)"})
    samples: int = field(default=1200, metadata={"help": "prompts in this run's slice (EasyR1: math12k in 10 parts of ~1.2k)"})
    data_offset: int = 0
    out: str = "out/grpo"
    prompt: Literal["auto", "chat", "fewshot"] = field(default="auto", metadata={"help": "auto: fewshot for offline data, else chat"})
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = field(default=0, metadata={"help": "0 disables (transformers would fill in 50)"})
    max_prompt_length: int = 2048
    max_response_length: int = field(default=3000, metadata={"help": "paper 3000; use tens on a CPU"})
    rollout_batch: int = field(default=128, metadata={"help": "prompts per step, over all ranks"})
    mini_batches: int = field(default=1, metadata={"help": "policy updates per rollout (EasyR1: 1)"})
    micro_batch: int = field(default=8, metadata={"help": "responses per forward/backward on one rank"})
    gen_batch: int = field(default=0, metadata={"help": "prompts per generate call (0: all of a rank's prompts, fastest; 1: rollouts independent of world size)"})
    lr: float = 1e-6
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    kl_coef: float = 1e-2
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    acc_weight: float = 0.9
    format_weight: float = 0.1
    verify_timeout: float = 5.0
    epochs: int = field(default=1, metadata={"help": "passes over the prompts (EasyR1 ran 15)"})
    max_steps: int = 0
    save_every: int = 0
    fsdp: bool = False  # recover.wrap's switch; GRPO runs DDP
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("--group-size must be >= 2: advantages compare responses within a group")


def train(model, tok, rows: list[tuple[str, str]], cfg: Config, reward_fn: Callable | None = None) -> dict:
    """GRPO on (question, answer) rows; final weights to cfg.out as an HF checkpoint (resumes from cfg.out).

    reward_fn(response_text, answer) -> {"reward", ...} defaults to math_reward. Call on every rank with the
    same rows. Returns {"model": the trained model, "steps", "reward", "time_s", ...}."""
    d, out = setup_dist(cfg.device), Path(cfg.out)
    if (out / "train_summary.json").exists():
        return {**json.loads((out / "train_summary.json").read_text()), "model": reload(model, out, d)}
    if cfg.fsdp:
        raise ValueError("grpo.py runs DDP; --fsdp is not supported here")
    style = cfg.prompt if cfg.prompt != "auto" else "fewshot" if cfg.data.startswith("offline") else "chat"
    reward_fn = reward_fn or (lambda text, answer: math_reward(text, answer, acc_weight=cfg.acc_weight,
                                                               format_weight=cfg.format_weight, timeout=cfg.verify_timeout))
    N, B, W, G = len(rows), cfg.rollout_batch, d.world, cfg.group_size
    if B % (W * cfg.mini_batches) or N < B:
        raise ValueError(f"--rollout-batch {B} must be a multiple of {W} ranks x --mini-batches {cfg.mini_batches} "
                         f"and at most the {N} prompts")
    per_epoch = N // B
    total = cfg.max_steps or cfg.epochs * per_epoch
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef else None  # the policy as it starts
    net = wrap(model, cfg, d)
    policy = net.module if hasattr(net, "module") else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start, elapsed = resume(out, net, opt, {"blocks": N, "tokens": 0, "config": asdict(cfg)})
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
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scored = [reward_fn(t, rows[mine[k // G]][1]) for k, t in enumerate(texts)]
        rewards = torch.tensor([x["reward"] for x in scored], dtype=torch.float32)
        adv = group_advantages(rewards, G)
        use = ~rewards.isnan()  # skipped responses: out of the loss
        row = train_step(net, policy, ref, opt, prompts, responses, adv, use, cfg, tok.pad_token_id, W)
        t_train = time.perf_counter() - t0 - t_gen
        stats = torch.tensor([rewards.nansum(), use.sum(), sum(x.get("accuracy", 0) for x in scored if not math.isnan(x["reward"])),
                              sum(x.get("format", 0) for x in scored), (rewards.view(-1, G).nan_to_num().std(1) == 0).sum(),
                              len(mine), sum(map(len, responses)), len(responses), t_gen, t_train], dtype=torch.float64)
        st = all_reduce_(stats.to(d.device)).tolist()
        row = {"step": step + 1, "reward": st[0] / max(st[1], 1), "accuracy": st[2] / max(st[1], 1),
               "format": st[3] / st[7], "kl": row["kl"], "zero_std": st[4] / st[5], "skipped": int(st[7] - st[1]),
               "response_len": st[6] / st[7], "loss": row["loss"], "grad_norm": row["grad_norm"],
               "gen_tokens_per_s": st[6] / (st[8] / W), "train_tokens_per_s": st[6] / (st[9] / W), "lr": cfg.lr}
        if d.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.write(f"step {step + 1}/{total} | reward {row['reward']:.3f} | acc {row['accuracy']:.3f} | format "
                      f"{row['format']:.3f} | kl {row['kl']:.4f} | zero-std {row['zero_std']:.2f} | len "
                      f"{row['response_len']:.1f} | gen tok/s {row['gen_tokens_per_s']:.0f} | train tok/s {row['train_tokens_per_s']:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_state(out / "checkpoints" / f"step_{step + 1}", net, opt, step + 1,
                       {"blocks": N, "tokens": 0, "config": asdict(cfg), "elapsed": time.time() - t_start})
    bar.close()
    summary = {"steps": total, "reward": row.get("reward", math.nan), "accuracy": row.get("accuracy", math.nan),
               "time_s": time.time() - t_start, "prompts": N, "world": W, "resumed_at": start, "prompt_style": style}
    save_final(out, model, net, tok, summary)
    return {**summary, "model": model.eval()}


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
    reported = torch.zeros(2, dtype=torch.float64)  # (loss, kl) token means, averaged over the updates
    for u in range(cfg.mini_batches):
        loss_sum, kl_sum = 0.0, 0.0
        part = range(u * per_update, min((u + 1) * per_update, len(chunks)))
        tokens = torch.tensor(float(sum(len(responses[i]) for k in part for i in chunks[k] if use[i])))
        n_tok = all_reduce_(tokens.to(next(policy.parameters()).device)).clamp(min=1)
        for j, k in enumerate(part):
            c = chunks[k]
            with grad_sync(net, j == len(part) - 1):
                logp, mask = response_logps(net, [prompts[i] for i in c], [responses[i] for i in c], pad_id, cfg.temperature)
                mask = mask * use[c][:, None].to(mask.device)
                old = old_lp[k] if old_lp[k] is not None else logp.detach()
                loss = grpo_token_loss(logp, old, ref_lp[k] if ref is not None else logp.detach(), adv[c].to(logp.device),
                                       clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                       beta=cfg.kl_coef if ref is not None else 0.0)
                # DDP averages gradients over ranks: x W makes the update sum(token losses) / n_tok exactly.
                ((loss * mask).sum() * W / n_tok).backward()
            loss_sum += float((loss.detach() * mask).sum())
            if ref is not None:
                kl_sum += float((k3_kl(logp.detach(), ref_lp[k]) * mask).sum())
        total = all_reduce_(torch.tensor([loss_sum, kl_sum], dtype=torch.float64, device=n_tok.device)) / n_tok
        if not all(math.isfinite(x) for x in total.tolist()):
            raise FloatingPointError(f"GRPO loss is {total[0].item()}; stopping before the update. Try a lower --lr.")
        gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        reported += total.cpu() / cfg.mini_batches
    return {"loss": reported[0].item(), "kl": reported[1].item(), "grad_norm": gnorm}


def main(cfg: Config) -> dict:
    d = setup_dist(cfg.device)
    model, tok = load_model(cfg.model, dtype="float32", device=d.device)
    rows = [question_answer(rec, where) for where, rec in
            load_rows(cfg.data, n=cfg.samples, seed=cfg.seed, offset=cfg.data_offset, check=question_answer)]
    result = train(model, tok, rows, cfg)
    cleanup_dist()
    return {k: v for k, v in result.items() if k != "model"}


if __name__ == "__main__":
    main(parse_config(Config))
