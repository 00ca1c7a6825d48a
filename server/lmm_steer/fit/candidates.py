"""Candidate steerings from a probe: the features that predict right answers amplified, those that
predict wrong ones suppressed, at a mode, strength and scope."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..engine import FeatureEdit, SteeringSpec
from ..scenes.evaluate import normalise
from .probe import Probe, fit_probe, sparsest_probe

MIN_CONFUSION = 4  # wrong answers a confusion needs in the fit split to get its own probe


@dataclass
class Candidate:
    """``up``: features to amplify, ``down``: to suppress, strongest first; ``why``: their weights."""

    family: str
    up: list[int]
    down: list[int]
    why: dict = field(default_factory=dict)


def from_probe(family: str, probe: Probe, top: int = 16) -> Candidate:
    up = probe.ranked(+1)[:top]
    down = probe.ranked(-1)[:top]
    return Candidate(family, [f for _, f, _ in up], [f for _, f, _ in down],
                     {"c": probe.c, "train_accuracy": probe.train_accuracy, "n": probe.n, "wrong": probe.wrong,
                      "up": [[p, f, round(w, 5)] for p, f, w in up], "down": [[p, f, round(w, 5)] for p, f, w in down]})


def confusions(items: list[dict], answers: list[str], minimum: int = MIN_CONFUSION) -> list[tuple[str, str, str, int]]:
    """``(type, truth, said, count)`` of the wrong answers seen at least ``minimum`` times, most frequent first."""
    seen = Counter((q["type"], normalise(q["answer"]), normalise(a)) for q, a in zip(items, answers, strict=True)
                   if normalise(a) != normalise(q["answer"]))
    return [(t, truth, said, n) for (t, truth, said), n in seen.most_common() if n >= minimum]


def build(codes: dict[str, torch.Tensor], items: list[dict], answers: list[str], *, c: float | None = None,
          top: int = 16, max_confusions: int = 4) -> list[Candidate]:
    """The probe over every question, then one per frequent confusion (its truth's questions: the
    confused answer against the right one). ``c``: the probes' inverse penalty; None: the sparsest
    that keeps ``top`` features (``sparsest_probe``)."""

    def probe_of(sub_codes, labels):
        return fit_probe(sub_codes, labels, c) if c is not None else sparsest_probe(sub_codes, labels, top)

    right = [normalise(a) == normalise(q["answer"]) for q, a in zip(items, answers, strict=True)]
    if len(set(right)) < 2:  # all right or all wrong: nothing tells them apart
        return []
    out = [from_probe("probe", probe_of(codes, right), top)]
    for kind, truth, said, n in confusions(items, answers)[:max_confusions]:
        rows = [i for i, q in enumerate(items) if q["type"] == kind and normalise(q["answer"]) == truth
                and (right[i] or normalise(answers[i]) == said)]
        labels = [right[i] for i in rows]
        if len(set(labels)) < 2:
            continue
        sub = {k: v[rows] for k, v in codes.items()}
        probe = probe_of(sub, labels)
        cand = from_probe(f"confusion:{kind}:{truth}->{said}", probe, top)
        cand.why["confusions"] = n
        out.append(cand)
    return [cand for cand in out if cand.up or cand.down]


def from_values(catalog, types) -> list[Candidate]:
    """Per question type, ``values:<type>``: each of its values' best-measured feature (the one
    ``steering.concepts`` clamps for that word: ``lmm-steer sae effects``), amplified where it
    fires, so what the image already says about the asked attribute is said louder. Empty for a
    catalog without measured effects."""
    from ..concepts.semantic import measured_features

    by_type: dict[str, dict[str, int]] = {}
    for word, ranked in sorted(measured_features(catalog).items()):
        entry = ranked[0][0]
        kind = entry.extras["effect"].get("type")
        if kind in types:
            by_type.setdefault(kind, {})[word] = entry.feature
    return [Candidate(f"values:{kind}", sorted(set(words.values())), [], {"values": words})
            for kind, words in sorted(by_type.items())]


def mean_active(codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per feature, its mean pooled activation where it fires at all (image pool; else text; else
    the final position)."""
    out = torch.zeros(codes["image"].shape[1])
    for pool in ("last", "text", "image"):  # image last: it wins where both fire
        if pool not in codes:
            continue
        x = codes[pool]
        fires = (x > 0).sum(0)
        seen = fires > 0
        out[seen] = x.sum(0)[seen] / fires[seen]
    return out


def question_type(family: str) -> str | None:
    """The question type a candidate's family was fitted on (``confusion:<type>:...``,
    ``values:<type>``), else None."""
    parts = family.split(":")
    if parts[0] == "values" and len(parts) == 2:
        return parts[1]
    return parts[1] if parts[0] == "confusion" and len(parts) > 2 else None


def steering(cand: Candidate, k: int, mode: str, strength: float, scope: str, typical: torch.Tensor,
             when: int | None = None) -> SteeringSpec:
    """The top ``k`` features of each side as edits: ``scale`` multiplies an amplified feature by
    ``strength`` where it fires and a suppressed one by 1/``strength``; ``add`` adds ``strength`` x the
    feature's typical activation along an amplified feature at every position in scope (SAVE's
    steering) and clamps a suppressed one at 0. ``when``: every edit acts only on prompts where that
    feature fires (e.g. the condition of the confusion's question type)."""
    edits = []
    for f in cand.up[:k]:
        if mode == "scale":
            edits.append(FeatureEdit(f, float(strength), "scale", when=when))
        else:
            edits.append(FeatureEdit(f, round(float(strength * typical[f]), 4), "add", when=when))
    for f in cand.down[:k]:
        edits.append(FeatureEdit(f, round(1.0 / strength, 4), "scale", when=when) if mode == "scale"
                     else FeatureEdit(f, 0.0, when=when))
    return SteeringSpec(edits, scope=scope)
