"""Choosing among candidates on the selection split: every candidate at every point of a grid of
sizes, modes, strengths and scopes, scored by fixed minus broken answers against the unsteered
model's, under the constraint that no question type loses more than ``max_loss`` of accuracy; then
the best of other families added while they add to the net.

Trying every point on every selection question costs most of a fit, and most questions are right
before and after. So every point is first screened on the questions the model gets wrong plus a
random sample of the right ones (their broken answers weighted back up to all right ones), and
only the best few by that estimate are asked on the whole selection split, whose counts alone
decide."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..engine import SteeringSpec
from ..eval.preset import tally
from ..scenes.evaluate import normalise
from .candidates import Candidate, steering
from .codes import request

GRID = {"k": (4, 12), "mode": ("scale", "add"), "strength": (2.0,), "scope": ("image",)}
MAX_LOSS = 0.01  # a type may lose at most one point of accuracy
CONFIRM = 3  # screened points asked on the whole selection split
RIGHT_SAMPLE = 1.5  # right answers screened per wrong one


def ask(engine, root: Path, items: list[dict], spec: SteeringSpec | None, max_tokens: int = 6,
        system: str | None = None) -> list[str]:
    """Greedy answers, every question with the same steering (or system prompt)."""
    reqs = [request(root, item, spec, max_tokens, system) for item in items]
    return [r.text for r in engine.generate(reqs)] if reqs else []


@dataclass
class Trial:
    family: str
    k: int
    mode: str
    strength: float
    scope: str
    spec: SteeringSpec
    result: dict  # eval.preset.tally over the selection questions

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
                **counts(self.result["all"]), "worst_type_loss": round(self.worst_loss(), 4),
                "by_type": {g: counts(v) for g, v in self.result.items() if g != "all"}}


def estimated(result: dict, weight: float) -> dict:
    """A screening tally scaled to the whole split: broken and kept-right answers count ``weight``
    times (they were sampled), fixed and kept-wrong ones once (all were asked)."""
    out = {}
    for group, r in result.items():
        broken, kept = r["broken"] * weight, r["kept right"] * weight
        n = broken + kept + r["fixed"] + r["kept wrong"]
        out[group] = {**r, "broken": broken, "kept right": kept, "n": n, "net": r["fixed"] - broken,
                      "accuracy_before": (kept + broken) / n, "accuracy_after": (kept + r["fixed"]) / n}
    return out


def screening_set(items: list[dict], base: list[str], seed: int = 0, ratio: float = RIGHT_SAMPLE) -> tuple[list[int], float]:
    """Indices of every wrongly answered question plus a sample of right ones, and the weight that
    scales the sampled right ones back to all of them."""
    wrong = [i for i, (q, a) in enumerate(zip(items, base, strict=True)) if normalise(a) != normalise(q["answer"])]
    right = sorted(set(range(len(items))) - set(wrong))
    sampled = random.Random(seed).sample(right, min(len(right), max(8, int(ratio * len(wrong)))))
    return sorted(wrong + sampled), (len(right) / len(sampled) if sampled else 1.0)


def merged(a: SteeringSpec, b: SteeringSpec) -> SteeringSpec:
    """``a``'s edits then ``b``'s on features ``a`` does not edit, in ``a``'s scope."""
    mine = {e.feature for e in a.edits}
    return replace(a, edits=[*a.edits, *(e for e in b.edits if e.feature not in mine)])


def choose(answer, items: list[dict], candidates: list[Candidate], typical: torch.Tensor, *,
           grid: dict = GRID, max_loss: float = MAX_LOSS, confirm: int = CONFIRM, progress=None) -> dict:
    """``{"base": answers, "screened": [...rows], "trials": [...rows], "chosen": Trial | None,
    "steps": [...]}``: ``screened`` holds every point's estimate, ``trials`` the whole-split counts
    of the ``confirm`` best. ``answer(items, spec)``: the model's answers under a steering (None:
    unsteered), e.g. ``ask`` bound to an engine."""
    base = answer(items, None)
    screen, weight = screening_set(items, base)
    few, few_base = [items[i] for i in screen], [base[i] for i in screen]
    screened = []
    points = list(itertools.product(grid["k"], grid["mode"], grid["strength"], grid["scope"]))
    for cand in candidates:
        for k, mode, strength, scope in points:
            spec = steering(cand, k, mode, strength, scope, typical)
            if not spec.edits:
                continue
            result = estimated(tally(few, few_base, answer(few, spec)), weight)
            screened.append(Trial(cand.family, k, mode, strength, scope, spec, result))
            if progress:
                progress(screened[-1])
    best = sorted((t for t in screened if t.feasible(max_loss) and t.net > 0), key=lambda t: (-t.net, t.k))
    trials = []
    for t in best[:confirm]:
        trials.append(replace(t, result=tally(items, base, answer(items, t.spec))))
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
            result = tally(items, base, answer(items, spec))
            both = Trial(f"{chosen.family}+{other.family}", chosen.k, chosen.mode, chosen.strength, chosen.scope, spec,
                         result)
            kept = both.feasible(max_loss) and both.net > chosen.net
            steps.append({"tried": other.row(), "net_together": both.net, "kept": kept})
            if kept:
                chosen = both
    return {"base": base, "screened": [t.row() for t in screened], "screen_questions": len(screen),
            "trials": [t.row() for t in trials], "chosen": chosen, "steps": steps}
