"""Which of a fitted preset's features fix its errors, and which break other types' answers?

Splits a preset written by `preset fit` by the pool its probe found each feature in (the image's
positions or the question's) and answers a split's questions with the whole preset and with each
part alone, through the same per-image fast path `preset fit` uses. With the fit split's cached pass
(`--fit-data`, `--fit-cache`), also the question features that fire on at most `--exclusive` of the
fit split's questions of every type but existence, and the whole preset gated (``where``) on the feature
that best tells the fit split's existence questions from the rest, in the question's pool and at the
final position. Run it on the selection split, never on the test
split: it is for choosing what to try next.

    python experiments/probes/fit_pool_split.py sae_weights/scenes-llava-next/presets/fitted.json \
        experiments/results/fit-scenes-seed31-seed32-2026-12-07.json scenes-32 \
        --fit-data scenes-31 --fit-cache fit-31-pass.safetensors
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

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
    parser.add_argument("--fit-data", help="the fit split")
    parser.add_argument("--fit-cache", help="the pass `preset fit --fit-cache` kept for it")
    parser.add_argument("--exclusive", type=float, default=0.2)
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
    types = tuple(record.get("types") or ("colour", "shape", "exist"))
    if args.fit_data and args.fit_cache:
        from safetensors.torch import load_file

        _, fit_items = load_examples(args.fit_data, None, types)
        cached = load_file(args.fit_cache)
        others = sorted({q["type"] for q in fit_items} - {"exist"})

        def fire_rates(pool: str) -> dict[str, torch.Tensor]:
            """Per question type, the share of the fit split's questions each feature fires on in ``pool``."""
            fires = cached[pool] > 0
            return {t: fires[[i for i, q in enumerate(fit_items) if q["type"] == t]].float().mean(0)
                    for t in [*others, "exist"]}

        rates = {pool: fire_rates(pool) for pool in ("text", "last")}
        elsewhere = {pool: torch.stack([r[t] for t in others]).amax(0) for pool, r in rates.items()}
        parts[f"question features firing on at most {args.exclusive:.0%} of other types"] = replace(
            spec, edits=[e for e in spec.edits if pool_of.get(e.feature) == "text"
                         and float(elsewhere["text"][e.feature]) <= args.exclusive])
        for pool in ("text", "last"):  # the feature that fires most on existence questions and least elsewhere
            gate = int((rates[pool]["exist"] - elsewhere[pool]).argmax())
            parts[f"whole preset gated on {gate} ({pool} pool: fires on {rates[pool]['exist'][gate]:.0%} of existence, "
                  f"{elsewhere[pool][gate]:.0%} of others)"] = replace(
                spec, edits=[replace(e, where=gate) for e in spec.edits])
    root, items = load_examples(args.data, None, types)
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
