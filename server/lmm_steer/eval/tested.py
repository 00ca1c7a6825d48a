"""Search hits chosen by what they do: ``eval fix``'s ``search-tested`` row.

Search ranks features by what their explanations say, and an explanation can name a colour its
feature does not cause. A user can check that without labels: clamp each of a word's top hits on
other images, ask the question the word answers ("What colour is the star?" for "red"), and keep
the hit that most often makes the model say the word where it did not before. Only the model's own
answers on a selection split are read, never its annotations, so the row is as automatic as
``search``; the oracle row is the one that reads ground truth. Every colour and shape value is
tested before the test split is opened.
"""

from __future__ import annotations

from pathlib import Path

from ..engine import SteeringSpec
from ..scenes.evaluate import normalise, questions
from ..scenes.generate import COLOURS, SHAPES
from .fix import ask, feature_edit, steering_value

VALUE_KEYS = tuple([f"colour:{c}" for c in COLOURS] + [f"shape:{s}" for s in SHAPES])


def effect_rates(said: list[list[str]], unsteered: list[str], value: str) -> list[float]:
    """Per candidate, the share of questions not answered ``value`` unsteered that its clamp turned
    into ``value``; ``said[c][q]`` is candidate c's answer to question q."""
    eligible = [q for q, got in enumerate(unsteered) if normalise(got) != value]
    if not eligible:
        return [0.0] * len(said)
    return [sum(normalise(answers[q]) == value for q in eligible) / len(eligible) for answers in said]


def pick(candidates: list[int], rates: list[float]) -> int | None:
    """The candidate with the highest rate, the better-ranked on a tie; the top hit when none has an
    effect (the row then falls back to plain search); None without candidates."""
    if not candidates:
        return None
    best = max(range(len(candidates)), key=lambda i: (rates[i], -i))
    return candidates[best] if rates[best] > 0 else candidates[0]


def tested_choice(engine, searcher, catalog, select: Path, *, candidates: int = 6, per_type: int = 6,
                  strength: float = 1.0, amplify: str = "clamp", scope: str = "image",
                  keys=VALUE_KEYS) -> dict[str, dict]:
    """``"colour:red" -> {"feature", "rate", "tried": [[feature, rate], ...]}``: of the top
    ``candidates`` search hits of each value's word, the one whose amplifying edit (``fix.feature_edit``)
    most often makes the model give that value on ``per_type`` questions of the value's type from
    ``select``."""
    kinds = sorted({k.split(":", 1)[0] for k in keys})
    asked = {kind: questions(select, None, (kind,))[:per_type] for kind in kinds}
    unsteered = {kind: ask(engine, select, items, [None] * len(items), max_tokens=4) for kind, items in asked.items()}
    hits = {}
    for key in keys:
        word = key.split(":", 1)[1]
        hits[key] = [e.feature for e, _ in searcher.search(word, candidates) if steering_value(catalog, e.feature) > 0]
    jobs = [(key, f, item) for key in keys for f in hits[key] for item in asked[key.split(":", 1)[0]]]
    specs = [SteeringSpec([feature_edit(catalog, f, +1, strength, amplify)], scope=scope) for _, f, _ in jobs]
    answers = iter(ask(engine, select, [item for _, _, item in jobs], specs, max_tokens=4))
    chosen = {}
    for key in keys:
        kind, value = key.split(":", 1)
        said = [[next(answers) for _ in asked[kind]] for _ in hits[key]]
        rates = effect_rates(said, unsteered[kind], value)
        feature = pick(hits[key], rates)
        if feature is not None:
            chosen[key] = {"feature": feature, "rate": round(rates[hits[key].index(feature)], 4),
                           "tried": [[f, round(r, 4)] for f, r in zip(hits[key], rates, strict=True)]}
    return chosen
