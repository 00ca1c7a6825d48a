"""Scoring explanations against the images, as the paper does, with ground truth where it exists.

IoU: on each of a feature's top images, the binarised activation mask (active patches upsampled to
the image) against the mask of what the explanation names. Grounding from COCO-format annotations:
the explanation's words that are a category name or an attribute value ("small", "red", "circle")
select the annotated objects that have all of them; an explanation naming none grounds to nothing.
Beside it, in the same run: random features (each explanation grounded on another feature's
images against that feature's masks), and a ceiling (on each image, the best IoU any single
annotated region reaches: one object, or the background, which is what no object covers), and the
best explanation (the phrase of annotated values, "red", "large circle", "the background", whose
grounding scores highest on the feature's images: an exact upper bound on any explanation's IoU under
this grounder, since every explanation grounds to such a phrase or to nothing). A
feature's ground-truth attribute is the annotated value (or the background) whose pixels overlap
its activations best over its top images; the explanation names it or not.

CLIP score: 100 x the cosine between the explanation's text embedding and each highlighted top
image's embedding, averaged; beside it, explanations shuffled among the features.
"""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..scenes.evaluate import normalise
from .grounders import AnnotationGrounder
from .highlight import highlight, region_mask

BACKGROUND = ("region", "background")


class Annotations:
    """A COCO file's objects by image, each with the (field, value) words it answers to."""

    def __init__(self, coco: dict, root: Path) -> None:
        from ..scenes.generate import rle_decode

        self.decode = rle_decode
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        self.by_file: dict[str, list[dict]] = {}
        files = {img["id"]: str((root / img["file_name"]).resolve()) for img in coco["images"]}
        for file in files.values():
            self.by_file[file] = []
        self.vocabulary: dict[str, set[tuple[str, str]]] = {}
        for ann in coco["annotations"]:
            words = {("category", normalise(categories[ann["category_id"]]))}
            words |= {(k, normalise(v)) for k, v in (ann.get("attributes") or {}).items() if isinstance(v, str)}
            self.by_file[files[ann["image_id"]]].append({"words": words, "segmentation": ann["segmentation"]})
            for field, value in words:
                self.vocabulary.setdefault(value, set()).add((field, value))
                if field == "category":  # plurals name the category too
                    for plural in (value + "s", value + "es"):
                        self.vocabulary.setdefault(plural, set()).add((field, value))
        # every pixel belongs to an annotated object or to the background, so "the background" is
        # annotated too: what no object covers
        self.vocabulary["background"] = {BACKGROUND}

    def named(self, explanation: str) -> set[tuple[str, str]]:
        """The (field, value) pairs an explanation names, longest phrases first."""
        text, found = f" {normalise(explanation)} ", set()
        for phrase in sorted(self.vocabulary, key=len, reverse=True):
            if f" {phrase} " in text:
                found |= self.vocabulary[phrase]
                text = text.replace(f" {phrase} ", " | ")
        return found

    def objects(self, file: str) -> list[dict]:
        return self.by_file.get(str(Path(file).resolve()), [])

    def mask(self, obj: dict) -> np.ndarray:
        if "mask" not in obj:
            obj["mask"] = self.decode(obj["segmentation"]).astype(bool)
        return obj["mask"]

    def grounded(self, named: set, file: str, shape: tuple[int, int]) -> np.ndarray:
        """The pixels of the objects having every named value; the background where it is named
        alone ("a red circle on a gray background" grounds to red circles)."""
        out = np.zeros(shape, bool)
        if named == {BACKGROUND}:
            for obj in self.objects(file):
                out |= self.mask(obj)
            return ~out
        named = named - {BACKGROUND}
        if not named:
            return out
        for obj in self.objects(file):
            if named <= obj["words"]:
                out |= self.mask(obj)
        return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def activation_mask(grid, shape: tuple[int, int]) -> np.ndarray:
    return region_mask(grid, *shape) >= 0.5


def _image_shape(file: str, cache: dict) -> tuple[int, int]:
    if file not in cache:
        with Image.open(file) as im:
            cache[file] = (im.height, im.width)
    return cache[file]


def phrases(ann: Annotations, files: list[str]) -> list[frozenset]:
    """Every phrase the annotations can ground on these images: each non-empty subset of an object's
    values ("red", "circle", "small red circle"), and the background."""
    out = {frozenset({BACKGROUND})}
    for file in files:
        for obj in ann.objects(file):
            words = sorted(obj["words"])
            out |= {frozenset(c) for n in range(1, len(words) + 1) for c in combinations(words, n)}
    return sorted(out, key=lambda c: (len(c), sorted(c)))


def best_phrase(ann: Annotations, images: list[dict], masks: list[np.ndarray], shapes: dict) -> tuple[float, list]:
    """The phrase whose grounding has the highest mean IoU with ``masks`` (one per top image), and
    that IoU: the best any explanation grounded by the annotations could score."""
    best, chosen = 0.0, []
    for named in phrases(ann, [e["image"] for e in images]):
        score = float(np.mean([iou(act, ann.grounded(set(named), e["image"], _image_shape(e["image"], shapes)))
                               for e, act in zip(images, masks, strict=True)]))
        if score > best:
            best, chosen = score, sorted(map(list, named))
    return best, chosen


def feature_ious(ann: Annotations | None, explanation: str, images: list[dict], shapes: dict, grounder=None) -> dict:
    """IoU of one explanation on some top images; with annotations, the best single-region ceiling
    and the ground-truth attribute (the value whose objects overlap the activations best).
    ``grounder``: what grounds the explanation (default: the annotations)."""
    grounder = grounder or AnnotationGrounder(ann)
    scores, ceiling, by_value, masks = [], [], {}, []
    for entry in images:
        shape = _image_shape(entry["image"], shapes)
        act = activation_mask(entry["grid"], shape)
        masks.append(act)
        scores.append(iou(act, grounder.ground(explanation, entry["image"], shape)))
        if ann is None:
            continue
        objects = ann.objects(entry["image"])
        background = ann.grounded({BACKGROUND}, entry["image"], shape)
        ceiling.append(max([iou(act, background), *(iou(act, ann.mask(o)) for o in objects)]))
        by_value.setdefault(BACKGROUND, []).append(iou(act, background))
        for value in {w for o in objects for w in o["words"]}:
            by_value.setdefault(value, []).append(iou(act, ann.grounded({value}, entry["image"], shape)))
    out = {"iou": float(np.mean(scores)) if scores else 0.0}
    if ann is None:
        return out
    named = ann.named(explanation)
    means = {v: sum(s) / len(images) for v, s in by_value.items()}
    best = max(means.values(), default=0.0)
    # values that always go together on these images (the red one is the circle) tie; naming any counts
    attribute = {v for v, m in means.items() if best > 0 and m >= best - 1e-9}
    best_iou, phrase = best_phrase(ann, images, masks, shapes)
    return {**out, "ceiling_iou": float(np.mean(ceiling)) if ceiling else 0.0,
            "best_iou": best_iou, "best_phrase": phrase,
            "attribute": sorted(map(list, attribute)), "named": sorted(map(list, named)),
            "names_attribute": bool(attribute & named)}


class ClipScorer:
    """100 x cosine of text and image embeddings: the scenes CLIP model (a projected vision tower
    whose text side is all-MiniLM-L6-v2) or any transformers CLIP model."""

    def __init__(self, path: str) -> None:
        from transformers import AutoConfig

        from ..models.scenes_llava_next import CLIP_NAME, CLIP_WEIGHTS

        path = str(CLIP_WEIGHTS) if path == CLIP_NAME else path
        kind = AutoConfig.from_pretrained(path).model_type
        if kind == "clip_vision_model":
            from transformers import CLIPVisionModelWithProjection

            from ..concepts.embedder import default_embedder

            self.vision = CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32).eval()
            self.size = self.vision.config.image_size
            self.embedder = default_embedder()
            self.clip = None
        else:
            from transformers import CLIPModel, CLIPProcessor

            self.clip = CLIPModel.from_pretrained(path).eval()
            self.processor = CLIPProcessor.from_pretrained(path)

    @torch.inference_mode()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        if self.clip is None:
            from ..scenes.vision import image_processor

            pixels = image_processor(self.size)(images, return_tensors="pt")["pixel_values"]
            return F.normalize(self.vision(pixel_values=pixels).image_embeds, dim=-1)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return F.normalize(self.clip.get_image_features(pixel_values=pixels), dim=-1)

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        if self.clip is None:
            return F.normalize(torch.as_tensor(np.asarray(self.embedder.encode(texts)), dtype=torch.float32), dim=-1)
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return F.normalize(self.clip.get_text_features(**tokens), dim=-1)


def derangement(n: int, rng: random.Random) -> list[int]:
    """A shuffle that moves every index (identity when n < 2)."""
    if n < 2:
        return list(range(n))
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            return order


def score(rows: list[dict], ann: Annotations | None, clip: ClipScorer | None = None, seed: int = 0,
          grounder=None) -> dict:
    """Scores of every explained row with top images; the per-feature scores are written into
    ``rows`` (under ``scores``). Without annotations (``ann`` None, a ``grounder`` given) there is
    no ceiling and no ground-truth attribute."""
    rng = random.Random(seed)
    grounder = grounder or AnnotationGrounder(ann)
    rows = [r for r in rows if r.get("explanation") and r.get("top_images")]
    shapes: dict = {}
    per = []
    for row in rows:
        per.append(feature_ious(ann, row["explanation"], row["top_images"], shapes, grounder))
    others = derangement(len(rows), rng)
    for row, result, j in zip(rows, per, others, strict=True):
        other = rows[j]["top_images"]
        result["random_iou"] = feature_ious(None, row["explanation"], other, shapes, grounder)["iou"] if len(rows) > 1 else 0.0
    if clip is not None and rows:
        text = clip.texts([r["explanation"] for r in rows])
        image_means = []
        for row in rows:
            shown = []
            for entry in row["top_images"]:
                with Image.open(entry["image"]) as im:
                    shown.append(highlight(im, entry["grid"]))
            image_means.append(clip.images(shown))
        shuffled = derangement(len(rows), rng)
        for i, (result, embeds) in enumerate(zip(per, image_means, strict=True)):
            result["clip"] = float(100 * (embeds @ text[i]).mean())
            result["shuffled_clip"] = float(100 * (embeds @ text[shuffled[i]]).mean())
    for row, result in zip(rows, per, strict=True):
        row["scores"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    keys = ["iou", "random_iou"] + (["ceiling_iou", "best_iou", "names_attribute"] if ann is not None else [])
    keys += ["clip", "shuffled_clip"] if clip else []
    mean = {k: round(float(np.mean([float(p[k]) for p in per])), 4) if per else 0.0 for k in keys}
    mean["iou_over_random"] = round(mean["iou"] / mean["random_iou"], 2) if mean.get("random_iou") else None
    return {"features": len(rows), "mean": mean,
            "per_feature": [{"feature": r["feature"], "explanation": r["explanation"], **r["scores"]} for r in rows]}


def markdown(result: dict) -> str:
    m = result["mean"]
    lines = ["| measure | explanations | baseline |", "|---|---|---|",
             f"| IoU (mean over {result['features']} features) | {m['iou']:.3f} | random features {m['random_iou']:.3f} |",
]
    if "ceiling_iou" in m:
        lines += [f"| IoU ceiling (best single region: an object or the background) | {m['ceiling_iou']:.3f} | |",
                  f"| IoU of the best explanation (the phrase of annotated values that scores highest) | {m['best_iou']:.3f} | |",
                  f"| names the ground-truth attribute | {m['names_attribute']:.1%} | |"]
    if "clip" in m:
        lines.append(f"| CLIP score | {m['clip']:.1f} | shuffled {m['shuffled_clip']:.1f} |")
    return "\n".join(lines) + "\n"


def load_annotations(path: Path, root: Path | None = None) -> Annotations:
    return Annotations(json.loads(Path(path).read_text()), root or Path(path).parent)
