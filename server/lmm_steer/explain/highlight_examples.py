"""Training examples for an explainer of feature highlights. A generated scene is highlighted the
way `sae explain` highlights a feature's top image (active patches of the base grid upsampled, the
rest darkened), and the answer is what its ground truth says the highlight shows:

- one object's patches -> "A small red circle."
- every object of one colour, shape or size (where the scene has two or more) -> "Red objects.",
  "Circles.", "Large objects."
- a wide stretch of patches no object covers -> "The background."
- one or two patches that no object fills -> "Unable." (the paper's answer to minimal highlights)

Most features that fire on the scenes SAE's image tokens light one or two patches of background
(docs/explain.md); an explainer trained only on exact single-object masks described those as its
most common object instead of declining."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..scenes.generate import REGION_QUESTION, make_scene, patch_shares, plural
from .highlight import highlight, region_mask

GRID = 8  # the base view's patches per side (128 px, patches of 16)
KINDS = {"minimal": 0.3, "object": 0.3, "colour": 0.12, "shape": 0.08, "size": 0.05, "background": 0.15}
OBJECT_SHARE = 0.4  # a minimal highlight names an object that fills this share of what it lights
BACKGROUND_PATCHES = 6  # fewer free patches than this and a background highlight is minimal instead


def _grid(active: np.ndarray) -> list[list[float]]:
    return active.reshape(GRID, GRID).astype(float).tolist()


def _group_answer(kind: str, value: str) -> str:
    if kind == "shape":
        return f"{plural(value).capitalize()}."
    return f"{value.capitalize()} objects."


def _minimal_answer(grid, scene, masks, size: int) -> str:
    lit = region_mask(grid, size, size) >= 0.5
    if lit.sum():  # a scene has at least one object
        shares = [(m & lit).sum() / lit.sum() for m in masks]
        best = int(np.argmax(shares))
        if shares[best] >= OBJECT_SHARE:
            return f"A {scene.objects[best].phrase()}."
    return "Unable."


def example(seed: int, index: int, k: int, size: int) -> tuple[list[list[float]], str, str]:
    """The ``k``-th highlight of scene ``index`` of split ``seed``: (patch grid, kind, answer)."""
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
            return _grid(active), kind, _group_answer(kind, value)
        kind = "object"
    if kind == "object":
        i = rng.randrange(len(scene.objects))
        active = cover[i] > threshold
        active[cover[i].argmax()] = True
        return _grid(active), kind, f"A {scene.objects[i].phrase()}."
    free = np.flatnonzero(cover.max(0) < 0.1)
    if kind == "background" and len(free) >= BACKGROUND_PATCHES:
        take = free if rng.random() < 0.5 else rng.sample(list(free), rng.randint(BACKGROUND_PATCHES, len(free)))
        active = np.zeros(GRID * GRID, bool)
        active[list(take)] = True
        return _grid(active), kind, "The background."
    active = np.zeros(GRID * GRID, bool)
    active[rng.sample(range(GRID * GRID), rng.choice((1, 1, 2)))] = True
    grid = _grid(active)
    return grid, "minimal", _minimal_answer(grid, scene, masks, size)


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
