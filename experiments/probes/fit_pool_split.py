"""Which of a fitted preset's features fix its errors, and which break other types' answers?

Splits a preset written by `preset fit` by the pool its probe found each feature in (the image's
positions or the question's) and answers a split's questions with the whole preset and with each
part alone, through the same per-image fast path `preset fit` uses. Run it on the selection split,
never on the test split: it is for choosing what to try next.

    python experiments/probes/fit_pool_split.py sae_weights/scenes-llava-next/presets/fitted.json \
        experiments/results/fit-scenes-seed31-seed32-2026-12-07.json scenes-32
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from lmm_steer.engine import EngineConfig
from lmm_steer.eval.preset import tally
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.examples import load_examples
from lmm_steer.presets import feature_spec, load_presets
from lmm_steer.scenes.commands import scene_engine
from sae_weights.default import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a preset file written by `preset fit`")
    parser.add_argument("fit", help="that fit's --json record (its candidates name each feature's pool)")
    parser.add_argument("data", help="a split to answer (the selection split)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    preset = next(iter(load_presets(args.preset).values()))
    record = json.loads(open(args.fit).read())
    family = record["chosen"]["family"] if "chosen" in record else preset.fit["chosen"]["family"]
    candidate = next(c for c in record["candidates"] if c["family"] == family)
    pool_of = {feature: pool for pool, feature, _ in candidate["up"] + candidate["down"]}
    spec = feature_spec(preset.steering)
    parts = {"whole preset": spec}
    for pool in sorted({pool_of.get(e.feature, "?") for e in spec.edits}):
        parts[f"{pool} features only"] = replace(spec, edits=[e for e in spec.edits if pool_of.get(e.feature) == pool])
    root, items = load_examples(args.data, None, tuple(record.get("types") or ("colour", "shape", "exist")))
    engine = scene_engine(args.model, None, None, None, EngineConfig(max_batch=16, max_seq_len=512))
    said = SplitAnswers(engine, root)(items, [None, *parts.values()])
    base = said[0]
    print(f"{family}, scope {spec.scope}; {len(items)} questions of {args.data}\n")
    print("| edits | n | fixed | broken | net | colour net | shape net | exist net |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, part), got in zip(parts.items(), said[1:], strict=True):
        r = tally(items, base, got)
        cells = " | ".join(f"{r[t]['net']:+d}" if t in r else "" for t in ("colour", "shape", "exist"))
        print(f"| {name} | {len(part.edits)} | {r['all']['fixed']} | {r['all']['broken']} | {r['all']['net']:+d} | "
              f"{cells} |")


if __name__ == "__main__":
    main()
