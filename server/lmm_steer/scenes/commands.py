"""``lmm-steer scenes generate``."""

from __future__ import annotations

import argparse
import json


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--n", type=int, required=True, help="scenes")
    p.add_argument("--seed", type=int, required=True, help="a test split takes a seed no training split used")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--regions", type=int, default=1, help="highlighted-region examples per scene")


def generate_command(args) -> int:
    from pathlib import Path

    from .generate import generate

    if args.n < 1 or args.size < 32 or args.regions < 0:
        raise SystemExit("lmm-steer scenes generate: --n must be >= 1, --size >= 32, --regions >= 0")
    print(json.dumps(generate(Path(args.out), args.n, args.seed, args.size, args.regions)))
    return 0
