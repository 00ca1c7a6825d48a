"""A named concept -> feature edits: the features search ranks first for it (those measured to make
the model say a word it names, then the nearest by meaning), clamped at their calibrated value
times the requested strength, on the scope that value was measured in.

A measured row may carry a condition (``when``: the feature that fires on prompts asking about the
type its value was measured on, e.g. colour questions); the edit then acts only on such prompts
unless the request turns conditions off.

A feature without a calibrated value is passed over when its catalog was calibrated (calibration
found no value where the concept shows before the text breaks); a catalog never calibrated falls
back to the README's recipe, three times the feature's largest activation. Negative strengths
push against the concept (the clamp value is negative: the feature's direction is subtracted).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.steering import SCOPES
from .semantic import feature_text

RECIPE_TIMES_MAX = 3.0
# `sae calibrate` measures strengths on generated positions only, and its rows name no scope; a
# request naming concepts and no scope gets the scope its first concept's value was measured in
# (a row's own, e.g. "image" for `sae effects`), so the values mean what they were measured to mean
CALIBRATED_SCOPE = "generated"
MAX_FEATURES = 1  # features per concept unless the request asks for more
CANDIDATES = 12  # nearest features considered before calibration filters them


class ConceptNotFound(ValueError):
    pass


@dataclass
class ConceptEdit:
    feature: int
    value: float
    similarity: float
    text: str
    calibrated: bool
    scope: str | None = None  # where the value was measured (None: never calibrated)
    when: int | None = None  # the condition its value was measured under (None: none)


def steer_value(entry) -> tuple[float | None, bool]:
    """(value to clamp at for strength 1, whether it was calibrated)."""
    steer = entry.extras.get("steer")
    if isinstance(steer, dict):
        return steer.get("value"), True
    peak = entry.extras.get("max_activation")
    return (RECIPE_TIMES_MAX * float(peak), False) if peak else (None, False)


def steer_scope(entry) -> str | None:
    """The scope a feature's calibrated value was measured in: its ``steer`` row's, else
    ``CALIBRATED_SCOPE``; None when it was never calibrated."""
    steer = entry.extras.get("steer")
    if not isinstance(steer, dict):
        return None
    return steer["scope"] if steer.get("scope") in SCOPES else CALIBRATED_SCOPE


def steer_condition(entry) -> int | None:
    """The ``when`` feature a row's value was measured under (``effects.conditions``), else None."""
    steer = entry.extras.get("steer")
    when = steer.get("when") if isinstance(steer, dict) else None
    return when if isinstance(when, int) and not isinstance(when, bool) else None


def candidates(index, text: str, limit: int = CANDIDATES) -> list[ConceptEdit]:
    """Search's first features for the concept and their strength-1 values (None where calibration
    found none)."""
    out = []
    for entry, score in index.search(text, limit):
        value, calibrated = steer_value(entry)
        out.append(ConceptEdit(entry.feature, value, round(float(score), 4), feature_text(entry)[:200], calibrated,
                               steer_scope(entry), steer_condition(entry)))
    return out


def concept_scope(chosen: list[ConceptEdit]) -> str:
    """The scope a concept's edits were measured in (its first calibrated edit's), else
    ``CALIBRATED_SCOPE``."""
    return next((c.scope for c in chosen if c.scope is not None), CALIBRATED_SCOPE)


def resolve_concept(index, text: str, strength: float = 1.0, max_features: int = MAX_FEATURES,
                    exclude: set[int] = frozenset()) -> list[ConceptEdit]:
    return choose(candidates(index, text), text, strength, max_features, exclude)


def choose(near: list[ConceptEdit], text: str, strength: float = 1.0, max_features: int = MAX_FEATURES,
           exclude: set[int] = frozenset()) -> list[ConceptEdit]:
    """Of the nearest features (nearest first), the first ``max_features`` that have a value, at
    ``strength`` times it; only the first ``CANDIDATES`` are considered."""
    chosen = []
    for c in near[:CANDIDATES]:
        if c.value is None or c.feature in exclude:
            continue
        chosen.append(ConceptEdit(c.feature, round(strength * c.value, 4), c.similarity, c.text, c.calibrated,
                                  c.scope, c.when))
        if len(chosen) == max_features:
            break
    if not chosen:
        raise ConceptNotFound(f"no steerable feature found for the concept {text!r}")
    return chosen
