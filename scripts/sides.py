"""Plumbing shared by the side-by-side benchmarks (bench_recover, bench_grpo, bench_eval): each side runs in
its own process, the sides alternated A B A B, and hands its result back as one JSON line on stdout."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

MARK = "RESULT "


def check_sides(sides: str, known: tuple) -> None:
    """Refuse, before anything runs, a --sides list that names no side or one this benchmark does not have."""
    names = [s for s in sides.split(",") if s]
    if not names or set(names) - set(known):
        raise ValueError(f"--sides {sides!r}: choose one or more of {', '.join(known)}, comma-separated")


def emit(res: dict) -> dict:
    """A worker's result, printed for run_sides to read."""
    print(MARK + json.dumps(res))
    return res


def reset_peak_rss() -> bool:
    """Set this process's peak resident memory (VmHWM) back to its current RSS (Linux: clear_refs 5), so a later
    peak_rss_mb() is the peak of what ran since, model loading excluded. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM (since reset_peak_rss), else getrusage's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LivePeak:
    """`with LivePeak(held) as p:` -> p.mb, the peak MB of live tensors inside the block: `held()` (MB live when it
    begins, e.g. weights and optimizer state) plus the highest running sum of torch.profiler's allocation events.
    The CPU analogue of torch.cuda.max_memory_allocated: unlike peak RSS it leaves out the freed pages that the C
    allocator keeps, which depend on allocation order rather than on what the training step holds."""

    def __init__(self, held):
        self.held, self.mb = held, None

    def __enter__(self):
        import torch
        self.base = self.held()
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = sorted((e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:  # nbytes > 0 allocates, < 0 frees
            live += e.nbytes()
            peak = max(peak, live)
        self.mb = self.base + peak / 2**20


def held_mb(model, opt) -> float:
    """MB of the model's parameters and gradients and the optimizer's state tensors."""
    ts = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    ts += [v for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes") and v.dim()]
    return sum(t.nbytes for t in ts) / 2**20


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
