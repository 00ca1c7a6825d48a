"""Can a steering make the scenes model read the object a question names? Most of its colour errors
name another object's colour (`attribute_readout.py`): the colour is there at the SAE's block, read
off the wrong object. This probe lights the named object up: on a colour question about a hexagon,
every colour's localised feature (chosen from ground truth on a fit split, `scenes localise`'s
choice) is scaled where the hexagon's localised feature fires, on the image alone; on a shape
question about the green object, every shape's feature where green's fires. The edit reads the
question's named value, which a served request has, so it could be served per request. Control
from the same run: the same edits lit where another value's feature fires (a wrong object).
Selection split only; no test split is read.

With ``--served`` the spotlight is asked as one steering for every question, the form a preset
would serve: each named value's edits carry a ``when`` condition, the feature that fires on the
prompts naming that value (`named_conditions.py`'s choice on the fit split's first 40 scenes), so
the engine decides per request which object to light; existence questions are asked too, since
a condition may leak onto them. It needs more edits than the engine's default table (32), so the
engine here is built with a wider one.

    python experiments/probes/fit_spotlight.py scenes-31 scenes-32 --factors 2,4 --json spotlight.json
    python experiments/probes/fit_spotlight.py scenes-31 scenes-32 --factors 2 --served --json spotlight-served.json
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import scenes_probe
from named_conditions import named_conditions

from lmm_steer.engine import FeatureEdit, SteeringSpec
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.examples import load_examples
from lmm_steer.scenes.localise import best_features

OTHER = {"colour": "shape", "shape": "colour"}


def served(engine, args, features: dict, factors: list[float], t0: float) -> int:
    """The spotlight as one conditioned steering for every question of the selection split."""
    conditions = named_conditions(engine, args.fit, 40)  # as `named_conditions.py` reads them

    def spec(factor: float) -> SteeringSpec:
        edits = []
        for label, cond in sorted(conditions.items()):
            if label == "exist":
                continue
            attr, value = label.split(" about ")
            edits += [FeatureEdit(f, factor, "scale", where=features[OTHER[attr]][value], when=cond.feature)
                      for f in features[attr].values()]
        return SteeringSpec(edits, scope="image")
    types = ("colour", "shape", "exist")
    root, items = load_examples(args.select, None, types)
    specs = {f"served x{f:g}": spec(f) for f in factors}
    print(f"{len(next(iter(specs.values())).edits)} edits a steering")
    base, *said = SplitAnswers(engine, root)(items, [None, *specs.values()])
    out = scenes_probe.tally_table(items, base, dict(zip(specs, said, strict=True)), types)
    record = {"command": f"python experiments/probes/fit_spotlight.py {args.fit} {args.select} --factors {args.factors}"
              " --served", "features": dict(features), "conditions": {k: c.record() for k, c in conditions.items()},
              "questions": len(items), "rows": out, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"seconds": record["seconds"]}))
    return scenes_probe.save(args.json, record)


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("fit", help="split the localised features are chosen on")
    p.add_argument("select", help="a selection split whose colour and shape questions are asked")
    p.add_argument("--factors", default="2,4")
    p.add_argument("--scenes", type=int, default=100, help="fit scenes read to choose the features")
    p.add_argument("--seed", type=int, default=0, help="the control's choice of another value")
    p.add_argument("--served", action="store_true", help="one steering for every question, conditioned per named value")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = scenes_probe.engine(args.threads, max_clamps=256)
    chosen = best_features(engine, Path(args.fit), args.scenes)
    features = defaultdict(dict)
    for key, f in chosen.items():
        attr, value = key.split(":")
        features[attr][value] = f
    factors = [float(x) for x in args.factors.split(",")]
    rng = random.Random(args.seed)
    if args.served:
        return served(engine, args, features, factors, t0)
    root, items = load_examples(args.select, None, ("colour", "shape"))
    groups = defaultdict(list)
    for i, item in enumerate(items):
        groups[item["type"], scenes_probe.named_value(item)].append(i)
    answers = SplitAnswers(engine, root)
    rows = ["base"] + [f"lit x{f:g}" for f in factors] + [f"another lit x{f:g}" for f in factors]
    said = {r: [None] * len(items) for r in rows}
    for (attr, named), idx in sorted(groups.items()):
        lit = features[OTHER[attr]]
        other = rng.choice(sorted(v for v in lit if v != named))

        def spec(factor: float, at: str, attr=attr, lit=lit) -> SteeringSpec:
            return SteeringSpec([FeatureEdit(f, factor, "scale", where=lit[at]) for f in features[attr].values()],
                                scope="image")
        steerings = [None] + [spec(f, named) for f in factors] + [spec(f, other) for f in factors]
        got = answers([items[i] for i in idx], steerings)
        for r, g in zip(rows, got, strict=True):
            for i, a in zip(idx, g, strict=True):
                said[r][i] = a
    out = scenes_probe.tally_table(items, said["base"], {r: said[r] for r in rows[1:]}, ("colour", "shape"))
    record = {"command": f"python experiments/probes/fit_spotlight.py {args.fit} {args.select} --factors {args.factors}",
              "features": dict(features), "questions": len(items), "rows": out,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"features": record["features"], "seconds": record["seconds"]}))
    return scenes_probe.save(args.json, record)


if __name__ == "__main__":
    raise SystemExit(main())
