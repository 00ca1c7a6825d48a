"""Where a captured decode step's device time goes: kernels per step, their busy time, the gaps
between them, and the time per kind of kernel (GEMM, attention, fused, elementwise, ...).

The batch-1 question on a GPU is how far the step sits from the weight-read limit and why: slow
GEMVs, slow attention, or too many small kernels with idle time between them. The device-step
rate alone cannot tell these apart; the kernels of a few graph replays can. Kernel names come from
the profiler's Chrome trace (``cat == "kernel"``); CUPTI's tracing itself adds a little to each
gap, so read the gaps as an upper bound and the step rate from the untraced bench rows.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import torch

# First match wins; names are matched in lower case. Inductor's kernels are triton_*, whatever
# they fuse; cuBLAS on Hopper names its GEMMs nvjet_*.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fused (compiled)", ("triton_",)),
    ("attention", ("fmha", "flash", "attention", "sdpa", "attn")),  # before gemm: fmha_cutlass*
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce")),
    ("top-k / sort", ("topk", "sort", "radix", "kthvalue", "withinkcounts")),
    ("index / scatter", ("index", "scatter", "gather", "embedding")),
    ("reduce / norm", ("reduce", "norm", "softmax", "argmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("copy / fill", ("copy", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def kernel_breakdown(events: list[dict], steps: int) -> dict:
    """Per-step figures from Chrome-trace events of ``steps`` back-to-back replays of one step.

    ``span_us`` runs from the first kernel's start to the last one's end; ``busy_us`` sums the
    kernels' durations (a captured step runs on one stream, so they do not overlap); the rest is
    ``gap_us``, time the device sat idle between kernels.
    """
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels or steps < 1:
        raise ValueError("the trace holds no kernels: was the step replayed on the GPU while profiling?")
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = sum(e["dur"] for e in kernels)
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        for table, key in ((by_kind, kernel_kind(e["name"])), (by_name, e["name"])):
            table[key][0] += e["dur"]
            table[key][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:8]
    return {
        "kernels_per_step": len(kernels) / steps,
        "span_us": (end - start) / steps,
        "busy_us": busy / steps,
        "gap_us": (end - start - busy) / steps,
        "kinds_us": {k: us / steps for k, (us, _) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
        "kinds_count": {k: n / steps for k, (_, n) in by_kind.items()},
        "top_kernels": [{"name": name[:120], "us": us / steps, "count": n / steps} for name, (us, n) in top],
    }


def profile_replays(replay, steps: int = 10) -> dict:
    """Profile ``steps`` calls of ``replay`` (one captured decode step each) and break them down."""
    from torch.profiler import ProfilerActivity, profile

    replay()  # not the first replay: lazy work stays out of the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return kernel_breakdown(events, steps)


def markdown(profiles: dict[str, dict]) -> list[str]:
    """One table: a row per profiled configuration, microseconds per step by kind of kernel."""
    if not profiles:
        return []
    kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
    kinds = [k for k in kinds if any(k in p["kinds_us"] for p in profiles.values())]
    head = "| step profile, us per step | kernels | span | busy | gaps | " + " | ".join(kinds) + " |"
    lines = [head, "|---|" + "---|" * (4 + len(kinds))]
    for name, p in profiles.items():
        cells = [f"{p['kernels_per_step']:.0f}"] + [f"{p[k]:.0f}" for k in ("span_us", "busy_us", "gap_us")]
        cells += [f"{p['kinds_us'].get(k, 0.0):.0f}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
