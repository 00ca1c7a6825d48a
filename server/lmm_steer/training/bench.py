"""``lmm-steer sae bench-train``: a training step's rate against the dense encoder matmul alone,
measured in the same run on the same synthetic activations (the only dense work a TopK step needs)."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from .trainer import SAETrainer, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--latents", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", default="32,128", help="comma-separated k values")
    p.add_argument("--steps", type=int, default=5, help="timed rounds per configuration (after one warm-up); each round times a step and a matmul")
    p.add_argument("--json", metavar="PATH")


def _interleaved(a, b, rounds: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately after one warm-up each, so that a
    shared machine's drifting speed hits both sides of the ratio alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _rss_bytes() -> int:
    """The process's resident memory now (Linux), or 0 where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    """What the ratio depends on: the ratio sets compute-bound GEMM speed against memory-bound
    sparse work, so a CPU with wider vectors (AVX-512) and the same memory gets a lower ratio from
    the same code. Recorded beside every result."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main(args) -> int:
    # a seed of its own: drawn from the trainer's seed, the batch could line up with the initial
    # weights (token i nearest latent i), a selection pattern real activations never have
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(args.batch, args.d_in, generator=g)
    ks = [int(v) for v in args.k.split(",")]

    def trainer_for(k):
        return SAETrainer(TrainConfig(num_latents=args.latents, k=k, batch_size=args.batch, steps=10**6,
                                      dead_tokens=10**9), args.d_in)

    # Training's own peak first, before the baseline's buffers exist: two steps per k above the
    # process's resident size at this point (torch, the batch)
    before = _rss_bytes()
    for k in ks:
        trainer = trainer_for(k)
        trainer.train_step(x)
        trainer.train_step(x)
        del trainer
    train_peak = _peak_bytes() - before
    w = torch.randn(args.latents, args.d_in, generator=g) / args.d_in**0.5
    bias = torch.zeros(args.latents)
    out = torch.empty(args.batch, args.latents)  # the baseline at its fastest: no page faults on a fresh output
    rows = []
    for k in ks:
        trainer = trainer_for(k)
        matmul_s, step_s = _interleaved(lambda: torch.addmm(bias, x, w.t(), out=out),
                                        lambda trainer=trainer: trainer.train_step(x), args.steps)
        params = sum(p.numel() * p.element_size() for p in trainer.params)
        rows.append({"k": k, "step_s": step_s, "matmul_s": matmul_s, "ratio": matmul_s / step_s,
                     "sae_param_bytes": params, "optimizer": trainer.cfg.optimizer,
                     # signum keeps one copy (z), Adam two moments
                     "optimizer_state_bytes": (1 if trainer.cfg.optimizer == "signum" else 2) * params,
                     "gradient_bytes": params,
                     "pre_activation_bytes": args.batch * args.latents * 4})
        del trainer
    host = machine()
    print(f"d_in {args.d_in}, latents {args.latents}, batch {args.batch}, torch {host['torch']}, "
          f"{host['threads']} threads, {host['cpu']} ({host['isa']})")
    print("| k | train step (s, median) | encoder matmul alone (s, median) | step rate / matmul rate |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['step_s']:.3f} | {r['matmul_s']:.3f} | {r['ratio']:.3f} |")
    r = rows[0]
    need = r["sae_param_bytes"] + r["optimizer_state_bytes"] + r["pre_activation_bytes"]
    print(f"training's peak memory {train_peak / 2**30:.2f} GiB above the process before it; SAE + {r['optimizer']} state + "
          f"one batch of pre-activations {need / 2**30:.2f} GiB, + gradients {(need + r['gradient_bytes']) / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "training_peak_bytes": train_peak, "peak_host_bytes": _peak_bytes(),
                       "machine": host}, f, indent=2)
    return 0
