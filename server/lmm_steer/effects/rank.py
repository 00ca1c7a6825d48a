"""How a measured effect ranks (pure arithmetic, imported by search): a catalog row's ``effect``
names the word its clamp makes the model say (``best``), how often where the model did not already
(``rate``, of ``n`` questions) and the share of the other question type's right answers it keeps
(``kept_other``). Search and concept steering put the features measured to say the word a query
names first: those measured over the grid of values (``stage`` "grid") before those only screened
at one value on a few scenes, each group strongest first. A row conditioned on its question type
(its ``steer`` carries ``when`` and the condition read by ``sae conditions``) ranks by the point it
steers at, and what its clamp breaks counts only on the other prompts its condition fires on."""

from __future__ import annotations

import math
import re

# a measured feature's search score: above any score by meaning (cosine plus a tenth of BM25, at
# most 1.1): 2 plus its strength (0 to 1), plus 1 when it was measured over the grid
MEASURED_SCORE = 2.0
ALIASES = {"grey": "gray", "colour": None, "color": None}


def lower_bound(rate: float, n: int, z: float = 1.0) -> float:
    """Wilson's lower confidence bound of a share ``rate`` of ``n`` (z = 1: about 84% one-sided):
    a rate measured on few questions ranks below the same rate measured on many."""
    if n <= 0:
        return 0.0
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def strength(effect: dict) -> float:
    """What search and concepts rank a measured effect by: the rate's lower bound times the share of
    the other type's answers kept."""
    kept = effect.get("kept_other")
    return lower_bound(float(effect.get("rate") or 0.0), int(effect.get("n") or 0)) * (
        1.0 if kept is None else float(kept))


def kept_under(kept: float, leak: float) -> float:
    """The share of the other type's right answers a clamp keeps when it acts only on prompts its
    condition fires on: it breaks ``1 - kept`` of them on the ``leak`` share where it fires."""
    return 1.0 - float(leak) * (1.0 - float(kept))


def under_condition(effect: dict, leak: float) -> dict:
    """``effect`` with its other type's answers kept as they are when its clamp acts only on prompts
    a condition fires on (``kept_under``)."""
    kept = effect.get("kept_other")
    return {**effect, "kept_other": None if kept is None else kept_under(kept, leak)}


def steered(effect: dict, steer: dict | None = None) -> dict:
    """The effect a row steers with: ``effect`` itself, or for a row conditioned on its question type
    (``steer`` with ``when`` and its ``condition``'s ``leak``) the rate and answers kept at the point
    it steers at, under the condition (``under_condition``)."""
    condition = (steer or {}).get("condition")
    if not isinstance(condition, dict) or steer.get("when") is None or condition.get("leak") is None:
        return effect
    point = {**effect, "rate": steer.get("rate", effect.get("rate")),
             "kept_other": steer.get("kept_other", effect.get("kept_other"))}
    return under_condition(point, condition["leak"])


def rank_key(effect: dict, steer: dict | None = None) -> tuple[int, float]:
    """(measured over the grid, strength of what the row steers with): the larger ranks first."""
    return int(effect.get("stage") == "grid"), round(strength(steered(effect, steer)), 4)


def measured_score(effect: dict, steer: dict | None = None) -> float:
    """A measured feature's search score (``MEASURED_SCORE`` plus its ``rank_key``)."""
    grid, s = rank_key(effect, steer)
    return round(MEASURED_SCORE + grid + s, 4)


def measured_word(extras: dict) -> str | None:
    """The word a catalog row's effect steers to, or None (no effect measured, or none found)."""
    effect = extras.get("effect")
    if not isinstance(effect, dict) or not isinstance(effect.get("best"), str):
        return None
    return effect["best"] if (effect.get("rate") or 0) > 0 else None


def named_words(query: str, known) -> list[str]:
    """The words of ``known`` that ``query`` names, in its order (plurals and "grey" read as theirs)."""
    out = []
    for token in re.findall(r"[a-z]+", query.lower()):
        token = ALIASES.get(token, token)
        if token is None:
            continue
        for form in (token, token[:-2] if token.endswith("es") else None, token[:-1] if token.endswith("s") else None):
            if form and form in known and form not in out:
                out.append(form)
                break
    return out
