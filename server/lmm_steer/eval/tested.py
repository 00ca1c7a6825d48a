"""Search hits chosen by what they do: ``eval fix``'s ``search-tested`` row.

Search ranks features by what their explanations say, and an explanation can name a colour its
feature does not cause. A user can check that without labels: clamp each of a word's top hits on
other images, ask the question the word answers ("What colour is the star?" for "red"), and keep
the hit that most often makes the model say the word where it did not before. Only the model's own
answers on a selection split are read, never its annotations, so the row is as automatic as
``search``; the oracle row is the one that reads ground truth. Every colour and shape value is
tested before the test split is opened.

A hit can also be tried as the run will use it: gated (``gate_for``: the gate of an edit of a value
on a selection question, e.g. ``eval fix --gate localised``'s feature of the asked object) and at
each strength of a grid, so the choice is a (feature, strength) pair. A gated clamp moves the
answer only if the feature is causal on the object's own few tokens, which an ungated trial (every
image token) does not tell.
"""

from __future__ import annotations

from collections.abc import Callable
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


def pick(candidates: list, rates: list[float]):
    """The candidate with the highest rate, the earlier on a tie (the better-ranked hit, then the
    smaller strength); the first when none has an effect (the row then falls back to plain search's
    top hit); None without candidates."""
    if not candidates:
        return None
    best = max(range(len(candidates)), key=lambda i: (rates[i], -i))
    return candidates[best] if rates[best] > 0 else candidates[0]


def tested_choice(engine, searcher, catalog, select: Path, *, candidates: int = 6, per_type: int = 6,
                  strength: float = 1.0, amplify: str = "clamp", scope: str = "image",
                  keys=VALUE_KEYS, strengths: tuple[float, ...] | None = None,
                  gate_for: Callable[[dict, str], int | None] | None = None) -> dict[str, dict]:
    """``"colour:red" -> {"feature", "strength", "rate", "tried": [[feature, strength, rate], ...]}``:
    of the top ``candidates`` search hits of each value's word, each at every factor of ``strengths``
    (default: ``strength`` alone), the one whose amplifying edit (``fix.feature_edit``, gated by
    ``gate_for(question, key)`` where given) most often makes the model give that value on
    ``per_type`` questions of the value's type from ``select``."""
    # ascending, so a tie (and the no-effect fallback) goes to the smaller strength, as documented
    strengths = tuple(sorted(set(strengths))) if strengths else (strength,)
    kinds = sorted({k.split(":", 1)[0] for k in keys})
    asked = {kind: questions(select, None, (kind,))[:per_type] for kind in kinds}
    unsteered = {kind: ask(engine, select, items, [None] * len(items), max_tokens=4) for kind, items in asked.items()}
    tries = {}
    for key in keys:
        word = key.split(":", 1)[1]
        hits = [e.feature for e, _ in searcher.search(word, candidates) if steering_value(catalog, e.feature) > 0]
        tries[key] = [(f, s) for f in hits for s in strengths]  # a tie goes to the better hit, then the smaller factor
    jobs = [(key, f, s, item) for key in keys for f, s in tries[key] for item in asked[key.split(":", 1)[0]]]
    specs = [SteeringSpec([feature_edit(catalog, f, +1, s, amplify, gate_for(item, key) if gate_for else None)],
                          scope=scope) for key, f, s, item in jobs]
    answers = iter(ask(engine, select, [item for *_, item in jobs], specs, max_tokens=4))
    chosen = {}
    for key in keys:
        kind, value = key.split(":", 1)
        said = [[next(answers) for _ in asked[kind]] for _ in tries[key]]
        rates = effect_rates(said, unsteered[kind], value)
        best = pick(tries[key], rates)
        if best is not None:
            chosen[key] = {"feature": best[0], "strength": best[1], "rate": round(rates[tries[key].index(best)], 4),
                           "tried": [[f, s, round(r, 4)] for (f, s), r in zip(tries[key], rates, strict=True)]}
    return chosen
