"""Is there a condition for the value a question names? A spotlight (`fit_spotlight.py`) keys on the
value a colour or shape question names ("What colour is the hexagon?"); to serve it as a preset,
each named value needs a feature that fires on the prompts naming it and not on the others (a
`when` condition, as `sae conditions` finds one per question type). Here each colour question is
labelled by the shape it names and each shape question by the colour it names, existence questions
kept as one more group, and `effects.conditions.by_type` picks each label's best feature on a fit
split's prompts: its recall on that label's prompts and its leak on every other prompt.

    python experiments/probes/named_conditions.py scenes-31 --scenes 40
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from lmm_steer.effects.clamps import ImageAnswers
from lmm_steer.effects.conditions import find_conditions
from lmm_steer.engine import EngineConfig
from lmm_steer.fit.examples import load_examples
from lmm_steer.scenes.commands import scene_engine

MODEL = "builtin:scenes-llava-next"
NAMED = {"colour": re.compile(r"What colour is the (\w+)\?"), "shape": re.compile(r"What shape is the (\w+) object\?")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="a fit split (`scenes generate`)")
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = scene_engine(MODEL, None, None, None, EngineConfig(max_batch=16, max_seq_len=512))
    root, items = load_examples(args.data, None, ("colour", "shape", "exist"))
    images = list(dict.fromkeys(q["image"] for q in items))[:args.scenes]
    items = [q for q in items if q["image"] in images]
    labelled = [{**q, "type": q["type"] if q["type"] == "exist" else f"{q['type']} about {NAMED[q['type']].match(q['question']).group(1)}"}
                for q in items]
    conditions = find_conditions(ImageAnswers(engine), root, labelled)
    print("| questions | feature | recall | leak | prompts |\n|---|---|---|---|---|")
    for label, c in sorted(conditions.items()):
        print(f"| {label} | {c.feature} | {c.recall:.2f} | {c.leak:.3f} | {c.n} |")
    usable = sum(c.usable for k, c in conditions.items() if k != "exist")
    print(json.dumps({"usable": usable, "named": len(conditions) - ("exist" in conditions),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": f"python experiments/probes/named_conditions.py {args.data} --scenes {args.scenes}",
                       "conditions": {k: c.record() for k, c in conditions.items()}, "usable": usable,
                       "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
