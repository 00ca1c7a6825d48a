"""Does saying louder what the image already says fix the scenes model's colour and shape errors?

`preset fit`'s opt-in values family (``--value-strengths``) scales, per question type, each value's
best-measured feature (the shipped catalog's `sae effects` rows, as ``fit.candidates.from_values``
picks them) where it fires, on that type's prompts alone (the type's condition: 770 colour, 2117
shape). This asks every question of a selection split under that family at a few factors, under a
fitted preset's edits, and under their union, against the unsteered answers: fixed, broken and net
per question type (selection split only; no test split is read).

With ``--cross`` it asks instead whether the other attribute's features help the model find the
object a question names (a colour question names a shape: "What colour is the hexagon?"): the
shape value features amplified on colour questions, the colour ones on shape questions.

    python experiments/probes/fit_values.py scenes-32 sae_weights/scenes-llava-next/presets/fitted.json
    python experiments/probes/fit_values.py scenes-32 sae_weights/scenes-llava-next/presets/fitted.json --cross
"""

from __future__ import annotations

import json
import time

import scenes_probe

from lmm_steer.engine import FeatureEdit, SteeringSpec
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.candidates import from_values, question_type
from lmm_steer.fit.examples import load_examples
from lmm_steer.presets import feature_spec, load_presets
from sae_weights import FeatureCatalog
from sae_weights.default import sources_for

CONDITIONS = {"colour": 770, "shape": 2117}  # `sae conditions` on the calibration split (seed 34)


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("select", help="a selection split (`scenes generate`)")
    p.add_argument("preset", help="a fitted preset file (its steering is combined with the values family)")
    p.add_argument("--cross", action="store_true", help="each type's features on the other type's questions")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = scenes_probe.engine(args.threads)
    catalog = FeatureCatalog.load_all(sources_for(scenes_probe.MODEL).catalogs)
    values = {question_type(c.family): c.up for c in from_values(catalog, ("colour", "shape"))}
    (_, shipped), = load_presets(args.preset).items()
    preset_spec = feature_spec(shipped.steering)
    preset = preset_spec.edits

    def louder(kind: str, factor: float, on: str | None = None) -> list[FeatureEdit]:
        return [FeatureEdit(f, factor, "scale", when=CONDITIONS[on or kind]) for f in values[kind]]

    if args.cross:
        rows = {f"{kind} values x{factor:g} on {on} questions": louder(kind, factor, on)
                for kind, on in (("shape", "colour"), ("colour", "shape")) for factor in (2.0, 4.0)}
    else:
        rows = {"preset": preset, "shape x4": louder("shape", 4.0), "shape x6": louder("shape", 6.0),
                "colour x2": louder("colour", 2.0), "preset + shape x4": preset + louder("shape", 4.0),
                "preset + shape x4 + colour x2": preset + louder("shape", 4.0) + louder("colour", 2.0)}
    types = ("colour", "shape") if args.cross else ("colour", "shape", "exist")
    root, items = load_examples(args.select, None, types)
    answers = SplitAnswers(engine, root)
    base = answers(items, [None])[0]
    said = answers(items, [SteeringSpec(edits, scope=preset_spec.effective_scope) for edits in rows.values()])
    out = scenes_probe.tally_table(items, base, dict(zip(rows, said, strict=True)), types)
    record = {"command": f"python experiments/probes/fit_values.py {args.select} {args.preset}"
              + (" --cross" if args.cross else ""), "values": values,
              "questions": len(items), "rows": out, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"questions": len(items), "values": values, "seconds": record["seconds"]}))
    return scenes_probe.save(args.json, record)


if __name__ == "__main__":
    raise SystemExit(main())
