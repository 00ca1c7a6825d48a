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

    for flag, value, least in (("--n", args.n, 1), ("--size", args.size, 32), ("--regions", args.regions, 0)):
        if value < least:
            raise SystemExit(f"lmm-steer: error: {flag} must be at least {least}, got {value}")
    print(json.dumps(generate(Path(args.out), args.n, args.seed, args.size, args.regions)))
    return 0
