"""Do an SAE's features point at the objects they are about? Measured on scenes, whose masks are
exact.

Each image token of the base view covers one patch of the scene. A patch counts as showing an
attribute value ("red", "star") when at least half of its pixels belong to objects with that value.
For each value, the feature whose firing patches (activation > 0) best overlap the value's patches
(IoU over a selection split) is chosen from ground truth, the way issue #17's ceiling is defined;
its IoU is then measured on a separate split. Same-run baselines: a random feature that fires on
images, and "every patch" (whose IoU is the value's share of the patches).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..explain.top_images import patch_activations as image_patch_activations
from .generate import patch_shares, rle_decode

ATTRIBUTES = ("colour", "shape")


def value_patches(masks_by_value: dict[str, np.ndarray], rows: int, cols: int) -> dict[str, np.ndarray]:
    """``value -> bool [rows * cols]``: patches at least half covered by that value's objects."""
    return {value: patch_shares(mask, rows, cols) >= 0.5 for value, mask in masks_by_value.items()}


def scene_masks(data: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Per scene: its image and ``"<attribute>:<value>" -> union mask`` of the visible pixels."""
    coco = json.loads((data / "annotations.json").read_text())
    shapes = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict[int, dict[str, np.ndarray]] = {}
    for ann in coco["annotations"]:
        mask = rle_decode(ann["segmentation"])
        values = by_image.setdefault(ann["image_id"], {})
        for key in (f"colour:{ann['attributes']['colour']}", f"shape:{shapes[ann['category_id']]}"):
            values[key] = values.get(key, np.zeros_like(mask)) | mask
    return [(img["file_name"], by_image.get(img["id"], {})) for img in coco["images"]]


DESCRIBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


def patch_activations(engine, image_path: Path) -> tuple[torch.Tensor, int, int]:
    """``[rows * cols, latents]`` SAE activations on the base view's patches, and the grid shape."""
    return image_patch_activations(engine, image_path, DESCRIBE)


def _collect(engine, data: Path, scenes: int):
    acts, labels = [], []
    for file, masks in scene_masks(data)[:scenes]:
        a, rows, cols = patch_activations(engine, data / file)
        acts.append(a > 0)
        labels.append(value_patches(masks, rows, cols))
    return stack_patches(acts, labels)


def stack_patches(acts: list[torch.Tensor], labels: list[dict[str, np.ndarray]]):
    """``(fired [patches, latents], value -> truth [patches])`` over scenes: each scene's firing
    patches and its ``value_patches``, a value a scene lacks counted false on its patches."""
    keys = sorted({k for lab in labels for k in lab})
    truth = {k: torch.from_numpy(np.concatenate([lab.get(k, np.zeros(len(a), bool)) for lab, a in zip(labels, acts, strict=True)]))
             for k in keys}
    return torch.cat(acts), truth


def iou(fired: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of each column of ``fired`` [patches, F] with ``truth`` [patches]."""
    t = truth[:, None]
    inter = (fired & t).sum(0).float()
    union = (fired | t).sum(0).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def choose_features(fired: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per attribute value, the feature whose firing patches best overlap its patches (by IoU)."""
    return {key: int(iou(fired, t).argmax()) for key, t in truth.items() if t.any()}


def best_features(engine, select: Path, scenes: int = 100) -> dict[str, int]:
    """``"colour:red" -> feature`` chosen from ground truth on the ``select`` split."""
    return choose_features(*_collect(engine, select, scenes))


def localise(engine, select: Path, test: Path, scenes: int = 100, seed: int = 0) -> dict:
    """Per attribute value: the feature chosen on ``select`` and its patch IoU on ``test``, beside
    a random image feature's and the every-patch baseline's."""
    fired_sel, truth_sel = _collect(engine, select, scenes)
    fired_test, truth_test = _collect(engine, test, scenes)
    on_images = torch.nonzero(fired_sel.any(0)).flatten().tolist()
    chosen = choose_features(fired_sel, truth_sel)
    rng = random.Random(seed)
    rows = {}
    for key in sorted(set(chosen) & set(truth_test)):
        if truth_test[key].sum() == 0:
            continue
        best = chosen[key]
        random_feature = rng.choice(on_images)
        everywhere = torch.ones(len(truth_test[key]), 1, dtype=torch.bool)
        rows[key] = {"feature": best, "iou": round(float(iou(fired_test[:, [best]], truth_test[key])[0]), 4),
                     "selection_iou": round(float(iou(fired_sel[:, [best]], truth_sel[key])[0]), 4),
                     "random_feature": random_feature,
                     "random_iou": round(float(iou(fired_test[:, [random_feature]], truth_test[key])[0]), 4),
                     "every_patch_iou": round(float(iou(everywhere, truth_test[key])[0]), 4),
                     "patches": int(truth_test[key].sum())}
    mean = {m: round(float(np.mean([r[m] for r in rows.values()])), 4) for m in ("iou", "random_iou", "every_patch_iou")}
    return {"select": str(select), "test": str(test), "scenes": scenes, "values": rows, "mean": mean}


def markdown(result: dict) -> str:
    """The per-value table and the means, beside both baselines."""
    lines = ["| value | feature | IoU (test) | IoU (selection) | random feature | every patch | patches |",
             "|---|---|---|---|---|---|---|"]
    for key, r in result["values"].items():
        lines.append(f"| {key} | {r['feature']} | {r['iou']:.3f} | {r['selection_iou']:.3f} | {r['random_iou']:.3f} "
                     f"| {r['every_patch_iou']:.3f} | {r['patches']} |")
    m = result["mean"]
    lines.append(f"| mean | | {m['iou']:.3f} | | {m['random_iou']:.3f} | {m['every_patch_iou']:.3f} | |")
    return "\n".join(lines) + "\n"
