"""Do the shipped preset and the spotlight add up? `preset fit` confirms on the whole selection split
only the best screened point of the few best families, and the spotlight's gain is too small to
rank among them on a 40-image screen; the two act on different question types (the preset on
existence questions, where its condition fires; the spotlight on colour and shape questions naming
a value), so their union may net about the sum. Asked on the whole selection split: the preset, the
spotlight (its slots as `preset fit` read them, from its --json record), and their union as one
steering (`fit.search.merged`, the rule `preset fit` adds families by). With ``--out`` the union is
written as a preset file carrying these figures and the command. Selection split only.

    python experiments/probes/fit_union.py scenes-32 sae_weights/scenes-llava-next/presets/fitted.json fit-10.json \
        --strength 2 --json union.json --out fitted-union.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import scenes_probe

from lmm_steer.fit import spotlight
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.candidates import Candidate
from lmm_steer.fit.examples import load_examples
from lmm_steer.fit.search import merged
from lmm_steer.presets import feature_spec, load_presets

TYPES = ("colour", "shape", "exist")


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("select", help="the selection split")
    p.add_argument("preset", help="a preset file (one preset) written by `preset fit`")
    p.add_argument("fit_json", help="a `preset fit --json` record holding the spotlight candidate")
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--out", help="write the union as a preset file here")
    args = p.parse_args()
    t0 = time.perf_counter()
    (name, preset), = load_presets(args.preset).items()
    record = json.loads(Path(args.fit_json).read_text())
    why = next(c for c in record["candidates"] if c["family"] == "spotlight")
    lit = Candidate("spotlight", [], [], {k: v for k, v in why.items() if k != "family"})
    base_spec = feature_spec(preset.steering)
    spot = spotlight.steering(lit, args.strength, base_spec.effective_scope)
    union = merged(base_spec, spot)
    engine = scenes_probe.engine(args.threads, max_clamps=256)
    root, items = load_examples(args.select, None, TYPES)
    steerings = {"preset": base_spec, f"spotlight x{args.strength:g}": spot, "preset + spotlight": union}
    base, *said = SplitAnswers(engine, root)(items, [None, *steerings.values()])
    rows = scenes_probe.tally_table(items, base, dict(zip(steerings, said, strict=True)), TYPES)
    command = " ".join(["python", "experiments/probes/fit_union.py", *sys.argv[1:]])
    seconds = round(time.perf_counter() - t0, 1)
    print(json.dumps({"edits": len(union.edits), "seconds": seconds}))
    if args.out:
        t = rows["preset + spotlight"]["all"]
        Path(args.out).write_text(json.dumps({
            "name": name,
            "description": (f"{preset.description.split(' Held out')[0]} Added: the spotlight (x{args.strength:g}, "
                            f"{len(spot.edits)} edits, each named value's on the prompts whose text names it); "
                            f"together on {len(items)} questions of {Path(args.select).name}: fixed {t['fixed']}, "
                            f"broke {t['broken']}.")[:500],
            "steering": {"features": [e.record() for e in union.edits], "scope": union.effective_scope},
            "fit": {**(preset.fit or {}), "union": {"command": command, "spotlight": why,
                                                     "select": {k: v["all"] for k, v in rows.items()}}},
        }, indent=1) + "\n")
    return scenes_probe.save(args.json, {"command": command, "questions": len(items), "edits": len(union.edits),
                                         "rows": rows, "seconds": seconds})


if __name__ == "__main__":
    raise SystemExit(main())
