"""Is there a condition for the value a question names? A spotlight (`fit_spotlight.py`) keys on the
value a colour or shape question names ("What colour is the hexagon?"); to serve it as a preset,
each named value needs a feature that fires on the prompts naming it and not on the others (a
`when` condition, as `sae conditions` finds one per question type). Here each colour question is
labelled by the shape it names and each shape question by the colour it names, existence questions
kept as one more group, and `effects.conditions.by_type` picks each label's best feature on a fit
split's prompts: its recall on that label's prompts and its leak on every other prompt.

The engine's `when` holds where the feature fires anywhere in the prompt, the image included, so a
feature of the named word that also fires on that object in the image leaks onto every question
about a scene holding one. With ``--text`` the features are read on the question's own positions
(every position but the image's tokens) alone: what a `when_on: "text"` condition reads.

    python experiments/probes/named_conditions.py scenes-31 --scenes 40
    python experiments/probes/named_conditions.py scenes-31 --scenes 40 --text
"""

from __future__ import annotations

import json
import time

import scenes_probe

from lmm_steer.effects.clamps import ImageAnswers
from lmm_steer.effects.conditions import by_type, prompt_peaks
from lmm_steer.fit.examples import load_examples


def named_conditions(engine, data: str, scenes: int, *, text: bool = False) -> dict:
    """Label -> ``effects.conditions.Condition`` over the colour, shape and existence questions of
    ``data``'s first ``scenes`` scenes, each colour or shape question labelled by the value it names
    (``scenes_probe.named``); read on the whole prompt, as the engine's ``when``, or on its text."""
    root, items = load_examples(data, None, ("colour", "shape", "exist"))
    images = set(list(dict.fromkeys(q["image"] for q in items))[:scenes])
    labelled = [{**q, "type": scenes_probe.named(q)} for q in items if q["image"] in images]
    return by_type(labelled, prompt_peaks(ImageAnswers(engine), root, labelled, text))


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("data", help="a fit split (`scenes generate`)")
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--text", action="store_true", help="read features on the question's text alone")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = scenes_probe.engine(args.threads)
    conditions = named_conditions(engine, args.data, args.scenes, text=args.text)
    print("| questions | feature | recall | leak | prompts |\n|---|---|---|---|---|")
    for label, c in sorted(conditions.items()):
        print(f"| {label} | {c.feature} | {c.recall:.2f} | {c.leak:.3f} | {c.n} |")
    usable = sum(c.usable for k, c in conditions.items() if k != "exist")
    print(json.dumps({"usable": usable, "named": len(conditions) - ("exist" in conditions),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return scenes_probe.save(args.json, {
        "command": f"python experiments/probes/named_conditions.py {args.data} --scenes {args.scenes}"
                   + (" --text" if args.text else ""),
        "conditions": {k: c.record() for k, c in conditions.items()}, "usable": usable,
        "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    raise SystemExit(main())
