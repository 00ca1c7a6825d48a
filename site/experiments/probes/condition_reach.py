"""On which question types does a condition feature fire? A served edit with ``when`` acts on
every prompt where its condition fires, whatever the question asks; ``sae conditions`` and ``preset
fit`` read each condition on the question types they were given. This reads, for the features
named, the share of a split's prompts of every question type (colour, shape, existence, count,
left, right) where each fires somewhere in the prompt's unedited hook-block output, exactly where
the engine decides a condition (``effects.conditions.prompt_peaks``). Where a feature never fires on
a type's prompts, an edit conditioned on it leaves those answers exactly the model's.

    python experiments/probes/condition_reach.py scenes-34 --features 3548,770,2117 --scenes 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmm_steer.effects.clamps import ImageAnswers
from lmm_steer.effects.commands import CONDITION_TYPES
from lmm_steer.effects.conditions import prompt_peaks
from lmm_steer.engine import EngineConfig
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.evaluate import questions

MODEL = "builtin:scenes-llava-next"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a `scenes generate` split")
    p.add_argument("--features", required=True, help="condition features, comma-separated")
    p.add_argument("--scenes", type=int, default=40, help="the split's first scenes whose prompts are read")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    features = [int(f) for f in args.features.split(",") if f]
    t0 = time.perf_counter()
    engine = scene_engine(MODEL, None, None, None, EngineConfig(max_batch=16))
    items = questions(Path(args.data), args.scenes, CONDITION_TYPES)
    fires = prompt_peaks(ImageAnswers(engine), Path(args.data), items)[:, features] > 0
    kinds = [q["type"] for q in items]
    table = {}
    print("| feature | " + " | ".join(f"{k} (n)" for k in CONDITION_TYPES) + " |")
    print("|---" * (len(CONDITION_TYPES) + 1) + "|")
    for j, f in enumerate(features):
        row = {}
        for kind in CONDITION_TYPES:
            mine = torch.tensor([k == kind for k in kinds])
            n = int(mine.sum())
            row[kind] = {"fires": int(fires[mine, j].sum()), "n": n}
        table[f] = row
        print(f"| {f} | " + " | ".join(f"{r['fires'] / max(r['n'], 1):.3f} ({r['n']})" for r in row.values()) + " |")
    out = {"command": "python experiments/probes/condition_reach.py " + " ".join(
        [args.data, "--features", args.features, "--scenes", str(args.scenes)]), "model": MODEL, "reach": table,
        "prompts": len(items), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"prompts": len(items), "seconds": out["seconds"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
