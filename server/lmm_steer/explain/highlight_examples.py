"""Training examples for an explainer of feature highlights. A generated scene is highlighted the
way `sae explain` highlights a feature's top image (active patches of the base grid upsampled, the
rest darkened), and the answer is what its ground truth says the highlight shows:

- one object's patches -> "A small red circle."
- every object of one colour, shape or size (where the scene has two or more) -> "Red objects.",
  "Circles.", "Large objects."
- a wide stretch of patches no object covers -> "The background."
- one or two patches, whatever they show -> "Unable." (the paper's answer to minimal highlights)

Most features that fire on the scenes SAE's image tokens light one or two patches of background
(experiments/explanations.md); an explainer trained only on exact single-object masks described those as its
most common object instead of declining. The first explainer was trained with one- and two-patch
highlights named when an object filled them; it then named one-object phrases for 45 two-patch
features with an IoU of 0.007, mostly objects that were not there, so now every such highlight
declines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..scenes.generate import REGION_QUESTION, make_scene, patch_shares, plural
from .highlight import highlight

GRID = 8  # the base view's patches per side (128 px, patches of 16)
KINDS = {"minimal": 0.1, "object": 0.4, "colour": 0.15, "shape": 0.1, "size": 0.05, "background": 0.2}
MINIMAL_PATCHES = 2  # a highlight of this many patches or fewer is declined
BACKGROUND_PATCHES = 6  # fewer free patches than this and a background highlight is minimal instead


def _grid(active: np.ndarray) -> list[list[float]]:
    return active.reshape(GRID, GRID).astype(float).tolist()


def _group_answer(kind: str, value: str) -> str:
    if kind == "shape":
        return f"{plural(value).capitalize()}."
    return f"{value.capitalize()} objects."


def example(seed: int, index: int, k: int, size: int) -> tuple[list[list[float]], str, str]:
    """The ``k``-th highlight of scene ``index`` of split ``seed``: (patch grid, kind, answer)."""
    active, kind, answer = _draw(seed, index, k, size)
    if active.sum() <= MINIMAL_PATCHES:
        return _grid(active), "minimal", "Unable."
    return _grid(active), kind, answer


def _draw(seed: int, index: int, k: int, size: int) -> tuple[np.ndarray, str, str]:
    rng = random.Random(f"{seed}/{index}/highlight/{k}")
    scene, _, masks = make_scene(seed, index, size)
    cover = np.stack([patch_shares(m, GRID, GRID) for m in masks])  # [objects, patches]
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    threshold = rng.choice((0.05, 0.25, 0.5))
    if kind in ("colour", "shape", "size"):
        counts: dict[str, list[int]] = {}
        for i, obj in enumerate(scene.objects):
            counts.setdefault(getattr(obj, kind), []).append(i)
        groups = [(v, ids) for v, ids in sorted(counts.items()) if len(ids) >= 2]
        if groups:
            value, ids = rng.choice(groups)
            active = (cover[ids] > threshold).any(0)
            for i in ids:  # every member shows, however small
                active[cover[i].argmax()] = True
            return active, kind, _group_answer(kind, value)
        kind = "object"
    if kind == "object":
        i = rng.randrange(len(scene.objects))
        active = cover[i] > threshold
        active[cover[i].argmax()] = True
        return active, kind, f"A {scene.objects[i].phrase()}."
    free = np.flatnonzero(cover.max(0) < 0.1)
    if kind == "background" and len(free) >= BACKGROUND_PATCHES:
        take = free if rng.random() < 0.5 else rng.sample(list(free), rng.randint(BACKGROUND_PATCHES, len(free)))
        active = np.zeros(GRID * GRID, bool)
        active[list(take)] = True
        return active, kind, "The background."
    active = np.zeros(GRID * GRID, bool)
    active[rng.sample(range(GRID * GRID), rng.choice((1, 1, 2)))] = True
    return active, "minimal", "Unable."


def write_highlights(data: Path, per_scene: int = 1) -> dict:
    """Add ``highlights/`` and ``highlights.jsonl`` (rows in the format of ``regions.jsonl``) to a
    ``scenes generate`` directory; returns counts by kind."""
    data = Path(data)
    meta = json.loads((data / "scenes.json").read_text())
    seed, size, n = meta["seed"], meta["size"], len(meta["scenes"])
    (data / "highlights").mkdir(exist_ok=True)
    kinds: dict[str, int] = {}
    with open(data / "highlights.jsonl", "w") as rows:
        for index in range(n):
            with Image.open(data / f"images/{index:06d}.png") as im:
                image = im.convert("RGB")
            for k in range(per_scene):
                grid, kind, answer = example(seed, index, k, size)
                file = f"highlights/{index:06d}_{k}.png"
                highlight(image, grid).save(data / file)
                rows.write(json.dumps({
                    "image": file, "scene": f"images/{index:06d}.png", "kind": kind, "grid": grid,
                    "conversations": [{"from": "human", "value": f"<image>\n{REGION_QUESTION}"},
                                      {"from": "gpt", "value": answer}],
                    "type": "highlight", "answer": answer.rstrip(".")}) + "\n")
                kinds[kind] = kinds.get(kind, 0) + 1
    return {"data": str(data), "highlights": sum(kinds.values()), "kinds": kinds}
