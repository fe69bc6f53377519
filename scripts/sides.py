"""Plumbing shared by the side-by-side benchmarks (bench_recover, bench_grpo, bench_eval): each side runs in
its own process, the sides alternated A B A B, and hands its result back as one JSON line on stdout."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

MARK = "RESULT "


def emit(res: dict) -> dict:
    """A worker's result, printed for run_sides to read."""
    print(MARK + json.dumps(res))
    return res


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")  # GEMMs and fused attention


def op_shares(prof, wall: float, groups: dict[str, tuple], rows: int = 12) -> dict[str, float]:
    """Print a torch.profiler run's top ops by self time, then {group: share of the wall time} of the ops whose
    names contain one of the group's strings, and the share outside any op (Python, tokenizer, data)."""
    ops = prof.key_averages()
    print(ops.table(sort_by="self_cpu_time_total", row_limit=rows))
    share = {k: sum(e.self_cpu_time_total for e in ops if any(s in e.key for s in v)) / 1e6 / wall
             for k, v in {**groups, "all ops": ("",)}.items()}
    share["outside any op"] = 1 - share["all ops"]
    print(f"wall {wall:.1f} s | " + " | ".join(f"{k} {v:.1%}" for k, v in share.items()))
    return share


def run_sides(script: str, cfg, sides: list[str], env: dict | None = None) -> dict[str, list[dict]]:
    """{side: [result of each repeat]}: `script` re-run with cfg's flags and --worker=side, cfg.repeats times
    per side, alternated, so that every side sees the same drift of a shared, noisy machine."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(cfg).items() if k not in ("worker", "repeats")]
    runs = {s: [] for s in sides}
    for _ in range(cfg.repeats):
        for side in runs:
            p = subprocess.run([sys.executable, script, *flags, f"--worker={side}"], capture_output=True, text=True,
                               env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
            if p.returncode or not line:
                raise RuntimeError(f"{side} failed:\n{p.stderr[-3000:]}")
            runs[side].append(json.loads(line[0][len(MARK):]))
    return runs
