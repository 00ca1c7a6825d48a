"""A steering preset's effect on a held-out scenes split: each question asked without and with the
preset's feature edits (greedy, through the steering engine, as `eval fix` asks), counted as kept
right, fixed, broken or kept wrong.

    python experiments/probes/preset_on_split.py PRESETS NAME SPLIT [LIMIT] [TYPES]
"""

import json
import sys
from collections import Counter
from pathlib import Path

from lmm_steer.eval.fix import ask
from lmm_steer.eval.preset import OUTCOMES, outcome
from lmm_steer.presets import feature_spec, load_presets
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.evaluate import normalise, questions


def main(presets: str, name: str, split: str, limit: int = 60, types: str = "colour,shape") -> None:
    steering = load_presets(presets)[name].steering
    if steering.concepts:
        raise SystemExit("this probe takes presets of feature edits only")
    spec = feature_spec(steering)
    engine = scene_engine("builtin:scenes-llava-next", None, None, None)
    data = Path(split)
    items = questions(data, limit, tuple(types.split(",")))
    plain = ask(engine, data, items, [None] * len(items))
    steered = ask(engine, data, items, [spec] * len(items))
    table = Counter()
    for item, a, b in zip(items, plain, steered, strict=True):
        said = normalise(a)
        kind = outcome(item["answer"], a, b)
        table[item["type"], kind] += 1
        table["all", kind] += 1
        table[f"answered {said!r} unsteered", kind] += 1
    kinds = OUTCOMES
    print("| questions | " + " | ".join(kinds) + " | accuracy unsteered -> steered |")
    print("|---" * (len(kinds) + 2) + "|")
    said = sorted({g for g, _ in table if g.startswith("answered")})
    for group in [*types.split(","), "all", *said]:
        row = [table[group, k] for k in kinds]
        n = sum(row)
        if n:
            print(f"| {group} ({n}) | " + " | ".join(map(str, row)) +
                  f" | {(row[0] + row[2]) / n:.3f} -> {(row[0] + row[1]) / n:.3f} |")
    print(json.dumps({"preset": name, "split": split, "limit": limit, "types": types}))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], args[2], *([int(args[3])] if len(args) > 3 else []), *args[4:5])
