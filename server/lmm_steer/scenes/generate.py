"""Synthetic 2D scenes with exact ground truth (CLEVR's idea, drawn flat so a CPU can make
thousands a minute): PNGs, COCO instances with per-object masks, captions, LLaVA-format question
conversations labelled by difficulty, and highlighted-region examples in the paper's style.

Every scene is a function of (seed, index) alone, so ``--n 10`` is a prefix of ``--n 1000`` and a
test split is a seed never used for training. Shapes are drawn without anti-aliasing: each pixel
belongs to exactly one object or to the background, so the masks are the drawing, not an
estimate of it. Later objects occlude earlier ones; an object's mask is what stays visible.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross")
# CLEVR's eight colour names, as flat RGB
COLOURS = {
    "gray": (128, 128, 128), "red": (200, 40, 40), "blue": (40, 70, 210), "green": (40, 160, 60),
    "brown": (130, 80, 40), "purple": (130, 50, 170), "cyan": (40, 190, 200), "yellow": (230, 210, 40),
}
SIZES = {"small": 0.06, "medium": 0.10, "large": 0.15}  # radius as a share of the image side
BACKGROUNDS = {
    "white": (245, 245, 245), "light gray": (200, 200, 200), "dark gray": (60, 60, 60), "beige": (225, 210, 180),
    "light blue": (190, 215, 235), "black": (20, 20, 20), "pale green": (200, 230, 200),
}
NEAR_COLOURS = 105.0  # RGB distance under which two colours count as easy to confuse (red/brown,
# gray/purple, gray/brown, blue/purple)
LOW_CONTRAST = 60.0  # luminance difference to the background under which an object is hard to see
OCCLUDED = 0.2  # share of an object hidden by later ones above which it counts as occluded
MIN_VISIBLE = 0.5  # a placement hiding more of any object than this is redrawn


@dataclass
class SceneObject:
    id: int
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    occlusion: float = 0.0  # share of the full shape hidden by objects drawn after it
    bbox: list[int] = field(default_factory=list)  # COCO [x, y, w, h] of the visible mask

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    index: int
    file: str
    width: int
    height: int
    background: str
    texture: str  # "plain" or "gradient"
    objects: list[SceneObject]


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]] | None:
    def ring(n, radius, offset):
        return [(cx + radius * math.cos(offset + 2 * math.pi * i / n), cy + radius * math.sin(offset + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "square":
        return ring(4, r, math.pi / 4 + turn)
    if shape == "diamond":
        return ring(4, r, turn)
    if shape == "triangle":
        return ring(3, r, -math.pi / 2 + turn)
    if shape == "hexagon":
        return ring(6, r, turn)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2 + turn), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5 + turn)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        w = r * 0.38
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return None  # circle


def shape_mask(shape: str, cx: float, cy: float, r: float, turn: float, width: int, height: int) -> np.ndarray:
    """The shape's full (unoccluded) pixels, drawn without anti-aliasing."""
    img = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(img)
    poly = _polygon(shape, cx, cy, r, turn)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(poly, fill=1)
    return np.array(img, dtype=bool)


def luminance(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _background(name: str, texture: str, width: int, height: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if texture == "gradient":  # a vertical shading of +-12%, so backgrounds are not always flat
        shade = np.linspace(0.88, 1.12, height, dtype=np.float32)[:, None, None]
        img = np.clip(img * shade, 0, 255)
    return img.astype(np.uint8)


def make_scene(seed: int, index: int, size: int = 128, max_objects: int = 6) -> tuple[Scene, np.ndarray, list[np.ndarray]]:
    """One scene: its graph, its RGB pixels [H, W, 3] and each object's visible mask [H, W]."""
    rng = random.Random(f"{seed}/{index}")
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choice(("plain", "plain", "gradient"))
    wanted = rng.randint(1, max_objects)
    for attempt in range(200):  # crowded draws are redrawn; after every 50 failures, one object fewer
        n = max(1, wanted - attempt // 50)
        objects, fulls = [], []
        for i in range(n):
            s = rng.choice(list(SIZES))
            r = SIZES[s] * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            objects.append(SceneObject(i, shape, colour, s, (round(cx, 2), round(cy, 2)), round(r, 2)))
            fulls.append(shape_mask(shape, cx, cy, r, rng.uniform(-0.3, 0.3), size, size))
        visible = [m.copy() for m in fulls]
        for i in range(n):
            for later in fulls[i + 1:]:
                visible[i] &= ~later
        hidden = [1 - v.sum() / max(1, f.sum()) for v, f in zip(visible, fulls, strict=True)]
        if max(hidden) <= MIN_VISIBLE:
            break
    pixels = _background(background, texture, size, size)
    for obj, mask, h in zip(objects, visible, hidden, strict=True):
        pixels[mask] = COLOURS[obj.colour]
        obj.occlusion = round(float(h), 4)
        ys, xs = np.nonzero(mask)
        obj.bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return Scene(index, f"images/{index:06d}.png", size, size, background, texture, objects), pixels, visible


# -- difficulty ----------------------------------------------------------------------------------

def difficulty(scene: Scene, obj: SceneObject) -> list[str]:
    """Why ``obj`` may be hard to recognise: small, low contrast, a near colour nearby, occluded."""
    tags = []
    if obj.size == "small":
        tags.append("small")
    if abs(luminance(COLOURS[obj.colour]) - luminance(BACKGROUNDS[scene.background])) < LOW_CONTRAST:
        tags.append("low_contrast")
    rgb = np.array(COLOURS[obj.colour], dtype=float)
    if any(o.colour != obj.colour and np.linalg.norm(rgb - np.array(COLOURS[o.colour], dtype=float)) < NEAR_COLOURS
           for o in scene.objects):
        tags.append("near_colours")
    if obj.occlusion > OCCLUDED:
        tags.append("occluded")
    return tags


def _union(*tag_lists: list[str]) -> list[str]:
    return sorted({t for tags in tag_lists for t in tags})


# -- questions -----------------------------------------------------------------------------------

def _count_word(n: int) -> str:
    return ("zero", "one", "two", "three", "four", "five", "six", "seven")[n] if n < 8 else str(n)


def plural(shape: str) -> str:
    # "cross" -> "crosses": until 2026-12-01 this added a bare "s" to it, and the shipped model was
    # trained on "How many crosss are there?" (830 of seed 1's count questions)
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def exist_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape}?"


def binding_negatives(objects: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(colour, shape) pairs absent from a scene whose colour is on one of its objects and whose
    shape is on another: the existence questions that only a model binding each colour to its own
    shape answers "no" to (most of run 11's easy existence errors were a "yes" to one of these)."""
    present = set(objects)
    colours, shapes = {c for c, _ in objects}, {s for _, s in objects}
    return sorted((c, s) for c in colours for s in shapes if (c, s) not in present)


def questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions with exact answers from the scene graph: colour, shape, count, exist, left/right.
    Each names its type, answer, the objects it is about and their difficulty tags."""
    objs = scene.objects
    out = []

    def add(qtype, question, answer, about):
        out.append({"type": qtype, "question": question, "answer": answer, "objects": [o.id for o in about],
                    "difficulty": _union(*(difficulty(scene, o) for o in about))})

    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    for o in objs:  # attributes, asked only where the description picks one object
        if len(by_shape[o.shape]) == 1:
            add("colour", f"What colour is the {o.shape}?", o.colour, [o])
        if len(by_colour[o.colour]) == 1:
            add("shape", f"What shape is the {o.colour} object?", o.shape, [o])
    shape = rng.choice(SHAPES)
    add("count", f"How many {plural(shape)} are there?", _count_word(len(by_shape[shape])), by_shape[shape])
    colour = rng.choice(list(COLOURS))
    add("count", f"How many {colour} objects are there?", _count_word(len(by_colour[colour])), by_colour[colour])
    present = rng.choice(objs)
    add("exist", exist_question(present.colour, present.shape), "yes", [present])
    absent = [(c, s) for c in COLOURS for s in SHAPES if not any(o.colour == c and o.shape == s for o in objs)]
    c, s = rng.choice(absent)
    add("exist", exist_question(c, s), "no", [])
    for o in objs:  # the nearest object on each side, where colour and shape name the subject alone
        if sum(p.colour == o.colour and p.shape == o.shape for p in objs) > 1:
            continue
        for side, sign in (("left", -1), ("right", 1)):
            beyond = [p for p in objs if sign * (p.centre[0] - o.centre[0]) > p.radius * 0.5 + o.radius * 0.5]
            if not beyond:
                continue
            nearest = min(beyond, key=lambda p: abs(p.centre[0] - o.centre[0]))
            if sum(p.phrase() == nearest.phrase() for p in objs) == 1:  # else the answer names two objects
                add(side, f"What is to the {side} of the {o.colour} {o.shape}?",
                    f"a {nearest.phrase()}", [o, nearest])
    return out


def caption(scene: Scene) -> str:
    parts = [f"a {o.phrase()}" for o in sorted(scene.objects, key=lambda o: o.centre[0])]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


# -- COCO ----------------------------------------------------------------------------------------

def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def patch_shares(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``[rows * cols]``: the share of each patch's pixels (row-major) that ``mask`` covers."""
    h, w = mask.shape
    return mask.reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3)).reshape(-1)


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(h * w, dtype=bool)
    at, fill = 0, False
    for run in rle["counts"]:
        values[at:at + run] = fill
        at, fill = at + run, not fill
    return values.reshape((w, h)).T


# -- the command ---------------------------------------------------------------------------------

REGION_QUESTION = "What does the highlighted region show?"
DARKEN = 0.25  # outside the highlighted object, pixels keep this share of their brightness


# asked after every question a caller sees (the first of a conversation); it keeps answers to a word
FORMAT_HINT = " Answer in a word or a short phrase."


def generate(out: Path, n: int, seed: int, size: int = 128, regions_per_scene: int = 1) -> dict:
    """Write ``n`` scenes under ``out``; returns counts. Files: images/, regions/, scenes.json,
    annotations.json (COCO instances), captions.jsonl, conversations.jsonl (LLaVA format; each row
    also carries type, answer and difficulty), dialogues.jsonl (a scene's questions as one
    multi-turn conversation, for collecting activations without repeating the image), regions.jsonl."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "regions").mkdir(exist_ok=True)
    coco = {"info": {"description": f"lmm-steer scenes, seed {seed}", "version": "1"},
            "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
            "images": [], "annotations": []}
    graphs, n_questions, n_regions = [], 0, 0
    with open(out / "conversations.jsonl", "w") as conv, open(out / "captions.jsonl", "w") as caps, \
            open(out / "regions.jsonl", "w") as regs, open(out / "dialogues.jsonl", "w") as dialogues:
        for index in range(n):
            scene, pixels, masks = make_scene(seed, index, size)
            Image.fromarray(pixels).save(out / scene.file)
            graphs.append(asdict(scene))
            coco["images"].append({"id": index + 1, "file_name": scene.file, "width": size, "height": size})
            for obj, mask in zip(scene.objects, masks, strict=True):
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": index + 1,
                    "category_id": SHAPES.index(obj.shape) + 1, "segmentation": rle_encode(mask),
                    "area": int(mask.sum()), "bbox": obj.bbox, "iscrowd": 0,
                    "attributes": {"colour": obj.colour, "size": obj.size, "occlusion": obj.occlusion}})
            caps.write(json.dumps({"image": scene.file, "caption": caption(scene)}) + "\n")
            rng = random.Random(f"{seed}/{index}/questions")
            turns = []
            for q in questions(scene, rng):
                turns += [{"from": "human", "value": f"{'<image>' + chr(10) if not turns else ''}{q['question']}"},
                          {"from": "gpt", "value": q["answer"]}]
                conv.write(json.dumps({
                    "id": f"{index:06d}-{n_questions}", "image": scene.file,
                    "conversations": [{"from": "human", "value": f"<image>\n{q['question']}{FORMAT_HINT}"},
                                      {"from": "gpt", "value": q["answer"]}],
                    "type": q["type"], "answer": q["answer"], "objects": q["objects"], "difficulty": q["difficulty"]}) + "\n")
                n_questions += 1
            if turns:
                turns[0]["value"] += FORMAT_HINT
                dialogues.write(json.dumps({"image": scene.file, "conversations": turns}) + "\n")
            for obj in rng.sample(scene.objects, min(regions_per_scene, len(scene.objects))):
                mask = masks[obj.id]
                shaded = (pixels * DARKEN).astype(np.uint8)
                shaded[mask] = pixels[mask]
                file = f"regions/{index:06d}_{obj.id}.png"
                Image.fromarray(shaded).save(out / file)
                regs.write(json.dumps({
                    "image": file, "scene": scene.file, "object": obj.id,
                    "conversations": [{"from": "human", "value": f"<image>\n{REGION_QUESTION}"},
                                      {"from": "gpt", "value": f"A {obj.phrase()}."}],
                    "type": "region", "answer": obj.phrase(), "difficulty": difficulty(scene, obj)}) + "\n")
                n_regions += 1
    (out / "scenes.json").write_text(json.dumps({"seed": seed, "size": size, "scenes": graphs}))
    (out / "annotations.json").write_text(json.dumps(coco))
    return {"out": str(out), "scenes": n, "objects": len(coco["annotations"]), "questions": n_questions,
            "regions": n_regions, "seed": seed}
