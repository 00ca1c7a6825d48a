"""How far does a fitted preset's strength go? Every edit of a preset of `scale` edits is raised to a
power (x2 becomes x2**p, /2 becomes /2**p, each keeping its condition), and every question of a
selection split is asked under each, against the unsteered answers: fixed, broken and net per
question type (selection split only; no test split is read).

    python experiments/probes/fit_strength.py scenes-32 sae_weights/scenes-llava-next/presets/fitted.json --powers 0.5,1,1.5,2,3
"""

from __future__ import annotations

import json
import time

import scenes_probe

from lmm_steer.engine import FeatureEdit, SteeringSpec
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.examples import load_examples


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("select", help="a selection split (`scenes generate`)")
    p.add_argument("preset", help="a fitted preset file of `scale` edits")
    p.add_argument("--powers", default="0.5,1,1.5,2,3", help="comma-separated powers of each edit's factor")
    p.add_argument("--types", default="colour,shape,exist")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = scenes_probe.engine(args.threads)
    steering = json.load(open(args.preset))["steering"]
    if any(f["mode"] != "scale" for f in steering["features"]):
        raise SystemExit("this probe takes presets of scale edits only")
    powers = [float(x) for x in args.powers.split(",")]
    types = tuple(args.types.split(","))
    root, items = load_examples(args.select, None, types)
    answers = SplitAnswers(engine, root)
    base = answers(items, [None])[0]
    specs = [SteeringSpec([FeatureEdit(f["id"], f["value"] ** pw, "scale", when=f.get("when"))
                           for f in steering["features"]], scope=steering.get("scope", "all")) for pw in powers]
    said = answers(items, specs)
    rows = scenes_probe.tally_table(items, base, {str(pw): got for pw, got in zip(powers, said, strict=True)}, types)
    record = {"command": f"python experiments/probes/fit_strength.py {args.select} {args.preset} --powers {args.powers}"
              f" --types {args.types}", "questions": len(items), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"questions": len(items), "seconds": record["seconds"]}))
    return scenes_probe.save(args.json, record)


if __name__ == "__main__":
    raise SystemExit(main())
