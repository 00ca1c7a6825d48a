"""Choosing among candidates on the selection split: every candidate at every point of a grid of
sizes, modes, strengths and scopes, scored by fixed minus broken answers against the unsteered
model's, under the constraint that no question type loses more than ``max_loss`` of accuracy; then
the best of other families added while they add to the net. A candidate fitted on one question
type (a confusion, or that type's values) is also tried conditioned on that type (every edit's
``when`` the feature that fires on such prompts alone, ``effects.conditions``), so it acts on those
questions only.

Trying every point on every selection question costs most of a fit. An image's questions share
its prefix (the fast answerer computes it once per image and steering), so points are screened on
the questions about a seeded sample of the split's images, and only the best few by those counts
(the best point of each of the best few families) are asked on the whole split, whose counts alone
decide."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

import torch

from ..engine import SteeringSpec
from ..engine.steering import repeat_refused
from ..eval.preset import tally
from . import spotlight
from .candidates import Candidate, question_type, steering

GRID = {"k": (4, 12), "mode": ("scale", "add"), "strength": (2.0,), "scope": ("image",), "condition": ("none",)}
CONDITIONS = ("none", "type")  # every prompt; the prompts of the candidate's question type alone
MAX_LOSS = 0.01  # a type may lose at most one point of accuracy
CONFIRM = 3  # screened points asked on the whole selection split
SCREEN_IMAGES = 40  # images of the selection split every point is screened on


@dataclass
class Trial:
    family: str
    k: int
    mode: str
    strength: float
    scope: str
    spec: SteeringSpec
    result: dict  # eval.preset.tally over the selection questions
    when: int | None = None  # the condition every edit carries (None: none)

    @property
    def net(self) -> int:
        return self.result["all"]["net"]

    def worst_loss(self) -> float:
        return max((r["accuracy_before"] - r["accuracy_after"] for g, r in self.result.items() if g != "all"),
                   default=0.0)

    def feasible(self, max_loss: float = MAX_LOSS) -> bool:
        return self.worst_loss() <= max_loss + 1e-9

    def row(self) -> dict:
        def counts(r: dict) -> dict:
            return {k: round(r[k], 1) for k in ("fixed", "broken", "net")}

        return {"family": self.family, "k": self.k, "mode": self.mode, "strength": self.strength, "scope": self.scope,
                "when": self.when, **counts(self.result["all"]), "worst_type_loss": round(self.worst_loss(), 4),
                "by_type": {g: counts(v) for g, v in self.result.items() if g != "all"}}


def screening_set(items: list[dict], images: int = SCREEN_IMAGES, seed: int = 0) -> list[int]:
    """Indices of the questions about a seeded sample of ``images`` of the split's images (all of
    them when it has no more)."""
    names = sorted({q["image"] for q in items})
    keep = set(random.Random(seed).sample(names, min(images, len(names))))
    return [i for i, q in enumerate(items) if q["image"] in keep]


def merged(a: SteeringSpec, b: SteeringSpec) -> SteeringSpec:
    """``a``'s edits then ``b``'s, in ``a``'s scope; an edit of ``b`` on a feature ``a`` edits is kept
    only where both carry a gate or condition and those differ (the engine's rule for a feature
    edited twice)."""
    keys: dict[int, set] = {}
    for e in a.edits:
        keys.setdefault(e.feature, set()).add(e.slot_key)
    return replace(a, edits=[*a.edits, *(e for e in b.edits if not repeat_refused(keys.get(e.feature, set()),
                                                                                   e.slot_key))])


def grid_points(candidates: list[Candidate], typical: torch.Tensor, grid: dict,
                conditions: dict[str, int] | None = None) -> list[Trial]:
    """Every candidate at every point of ``grid``; condition ``type`` applies to candidates fitted
    on one question type that has a condition in ``conditions`` (type -> feature). A ``values``
    candidate (one feature per value of its type) is tried whole, scaled where its features fire, at
    ``grid["value_strength"]``, on its type's prompts alone where that type has a condition. The
    ``spotlight`` candidate is tried at each of ``grid["spotlight_strength"]`` (``fit.spotlight``)."""
    points = []
    for cand in candidates:
        if cand.family == "spotlight":
            for strength, scope in itertools.product(grid.get("spotlight_strength", ()), grid["scope"]):
                spec = spotlight.steering(cand, strength, scope)
                points.append(Trial(cand.family, len(spec.edits), "scale", strength, scope, spec, {}))
            continue
        axes = (grid["k"], grid["mode"], grid["strength"], grid["scope"], grid.get("condition", ("none",)))
        if cand.family.startswith("values:"):
            kind = question_type(cand.family)
            axes = ((len(cand.up),), ("scale",), grid.get("value_strength", grid["strength"]), grid["scope"],
                    ("type",) if kind in (conditions or {}) and "type" in axes[4] else ("none",))
        for k, mode, strength, scope, condition in itertools.product(*axes):
            when = None
            if condition == "type":
                when = (conditions or {}).get(question_type(cand.family))
                if when is None:
                    continue
            spec = steering(cand, k, mode, strength, scope, typical, when)
            if spec.edits:
                points.append(Trial(cand.family, k, mode, strength, scope, spec, {}, when))
    return points


def choose(answer, items: list[dict], candidates: list[Candidate], typical: torch.Tensor, *,
           grid: dict = GRID, max_loss: float = MAX_LOSS, confirm: int = CONFIRM, screen_images: int = SCREEN_IMAGES,
           conditions: dict[str, int] | None = None, progress=None) -> dict:
    """``{"base": answers, "screened": [...rows], "trials": [...rows], "chosen": Trial | None,
    "steps": [...]}``: ``screened`` holds every point's counts on the screening questions,
    ``trials`` the whole-split counts of the ``confirm`` best. ``answer(items, steerings)``: the
    model's answers under each steering (None: unsteered), ``[steering][item]``
    (``fit.answers.SplitAnswers``)."""
    base = answer(items, [None])[0]
    screen = screening_set(items, screen_images)
    few, few_base = [items[i] for i in screen], [base[i] for i in screen]
    points = grid_points(candidates, typical, grid, conditions)
    screened = []
    for point, said in zip(points, answer(few, [p.spec for p in points]) if points else [], strict=True):
        screened.append(replace(point, result=tally(few, few_base, said)))
        if progress:
            progress(screened[-1])
    # the best point of each family, the best `confirm` families: another point of a family already
    # confirmed could not be added to it, so a second family's best is worth the whole split more
    best, families = [], set()
    for t in sorted((t for t in screened if t.feasible(max_loss) and t.net > 0), key=lambda t: (-t.net, t.k)):
        if t.family not in families and len(best) < confirm:
            best.append(t)
            families.add(t.family)
    if len(screen) == len(items):  # the screen was the whole split
        trials = best
    else:
        trials = [replace(t, result=tally(items, base, said))
                  for t, said in zip(best, answer(items, [t.spec for t in best]) if best else [], strict=True)]
    ranked = sorted((t for t in trials if t.feasible(max_loss) and t.net > 0), key=lambda t: (-t.net, t.k))
    chosen, steps = None, []
    if ranked:
        chosen = ranked[0]
        steps.append({"added": chosen.row(), "net": chosen.net})
        used = {chosen.family}
        for other in ranked[1:]:  # the best trial of each other family, added while the net grows
            if other.family in used or other.scope != chosen.scope:
                continue
            used.add(other.family)
            spec = merged(chosen.spec, other.spec)
            result = tally(items, base, answer(items, [spec])[0])
            both = Trial(f"{chosen.family}+{other.family}", chosen.k, chosen.mode, chosen.strength, chosen.scope, spec,
                         result, chosen.when if chosen.when == other.when else None)
            kept = both.feasible(max_loss) and both.net > chosen.net
            steps.append({"tried": other.row(), "net_together": both.net, "kept": kept})
            if kept:
                chosen = both
    return {"base": base, "screened": [t.row() for t in screened], "screen_questions": len(screen),
            "trials": [t.row() for t in trials], "chosen": chosen, "steps": steps}
