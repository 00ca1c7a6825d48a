"""The spotlight family: make the model read the object a question names.

Most of the scenes model's colour and shape errors are errors of binding: the asked object's colour
is written on its own patches at the SAE's block, and the model answers with a neighbour's
(experiments/steering-fit.md#binding-errors). The spotlight lights the named object up: on "What
colour is the hexagon?", every colour's localised feature is scaled where the hexagon's localised
feature fires, so the hexagon's colour says itself louder than the neighbours'.

Served as one steering for every request, each named value's edits carry a condition: the feature
that fires on the text of the prompts naming that value and on few others (``when_on: text``, so
a hexagon in the picture does not open it; only the question's word does). Both choices are read on
a fit split's scenes: the localised feature of each value from the first scenes' masks (``scenes
localise``'s rule, best patch IoU over 100 scenes: on 40 the choice is noisy, two values may share
a feature), each named value's condition from a sample's prompts (``effects.conditions.by_type``,
on the text). The family needs scenes with masks
(``annotations.json``), as ``scenes generate`` writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..effects.conditions import by_type
from ..engine import FeatureEdit, SteeringSpec
from ..scenes.localise import choose_features, scene_masks, stack_patches, value_patches
from .candidates import Candidate

OTHER = {"colour": "shape", "shape": "colour"}  # the attribute a question of each type names its object by


def named_value(question: str, values) -> str | None:
    """The first of ``values`` the question names as a word ("hexagon" in "What colour is the hexagon?")."""
    found = [(m.start(), v) for v in values for m in [re.search(rf"\b{re.escape(v)}\b", question.lower())] if m]
    return min(found)[1] if found else None


def label(item: dict, vocabulary: dict[str, set[str]]) -> str:
    """A question's label by the value it names ("colour about hexagon"), ``vocabulary`` each type's
    answers; other questions keep their type."""
    other = OTHER.get(item["type"])
    named = named_value(item["question"], vocabulary.get(other, ())) if other else None
    return f"{item['type']} about {named}" if named else item["type"]


def localised(fast, root: Path, images: int) -> dict[str, int]:
    """``"colour:red" -> feature``: each value's feature whose firing patches best overlap its
    patches over the first ``images`` scenes of ``root`` (``scenes localise``'s rule), read on each
    image's prefix alone; empty where the split has no masks."""
    try:
        scenes = scene_masks(root)[:images]
    except FileNotFoundError:
        return {}
    acts, truth_rows = [], []
    for image, masks in scenes:
        entry = fast.prepare_prefix(root, image, [])
        if entry.base_patches is not None:
            acts.append(entry.base_patches > 0)
            truth_rows.append(value_patches(masks, *entry.grid))
        fast.forget(image)
    return choose_features(*stack_patches(acts, truth_rows)) if acts else {}


def candidate(fast, root: Path, items: list[dict], text_peaks: torch.Tensor, images: int = 100) -> Candidate | None:
    """The spotlight: values localised on the first ``images`` scenes of ``root``, each named value's
    condition read on ``items`` (every question of a sample of them) by ``text_peaks`` (their
    ``effects.conditions.prompt_peaks`` on the text); None where the split has no masks or no named
    value has a usable condition. ``why`` keeps each value's localised feature, each named value's
    condition, and the slots the steering is built from."""
    features = localised(fast, root, images)
    if not features:
        return None
    values: dict[str, dict[str, int]] = {}
    for key, f in features.items():
        attr, value = key.split(":", 1)
        values.setdefault(attr, {})[value] = f
    vocabulary: dict[str, set[str]] = {}
    for q in items:
        vocabulary.setdefault(q["type"], set()).add(q["answer"].strip().lower())
    labelled = [{**q, "type": label(q, vocabulary)} for q in items]
    conditions = by_type(labelled, text_peaks)
    slots = []
    for name, cond in sorted(conditions.items()):
        if " about " not in name or not cond.usable:
            continue
        asked, named = name.split(" about ")
        if asked not in values or named not in values.get(OTHER[asked], {}):
            continue
        slots.append({"label": name, "asked": sorted(set(values[asked].values())),
                      "where": values[OTHER[asked]][named], "when": cond.feature})
    if not slots:
        return None
    return Candidate("spotlight", [], [], {
        "features": features, "images": images, "slots": slots,
        "conditions": {k: {**c.record(), "usable": c.usable} for k, c in conditions.items() if " about " in k}})


def steering(cand: Candidate, strength: float, scope: str) -> SteeringSpec:
    """Every slot's asked features scaled by ``strength`` where its named value's feature fires, on the
    prompts whose text names that value."""
    edits, seen = [], set()
    for slot in cand.why["slots"]:
        for f in slot["asked"]:
            edit = FeatureEdit(f, float(strength), "scale", where=slot["where"], when=slot["when"], when_on="text")
            if (f, edit.slot_key) not in seen:
                seen.add((f, edit.slot_key))
                edits.append(edit)
    return SteeringSpec(edits, scope=scope)
