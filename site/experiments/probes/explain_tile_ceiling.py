"""Probe for issue #17: would masks from the 2x tiles' patch grid let explanations score higher?

The paper's masks come from the base view's patch grid: 8 x 8 patches of 16 px on a 128 px scene,
where a small object (about 15 px across) covers half of no patch. The scenes model's AnyRes also
sees the scene at 2x in four tiles, a 16 x 16 grid of 8 px patches. For each scored feature of an
explained catalog, on its top images, this compares the ceiling (the best IoU any single annotated
object reaches with the activation mask) from the base grid and from the tile grid.

    python experiments/probes/explain_tile_ceiling.py SCORED_CATALOG.jsonl DATA_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lmm_steer.engine.factory import build_engine
from lmm_steer.engine.hookpoint import capture_block_output
from lmm_steer.engine.prefill import image_token_id
from lmm_steer.explain.score import activation_mask, iou, load_annotations
from lmm_steer.explain.top_images import IMAGE_ONLY
from lmm_steer.models.inputs import build_inputs

BASE, TILES = 8, 16  # base view 8 x 8; the 2x scene in 2 x 2 tiles of 8 x 8, each row ending in a newline


@torch.inference_mode()
def grids(engine, path: str, features: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[F, 8, 8]`` base-view and ``[F, 16, 16]`` tile-grid activations of ``features``."""
    from PIL import Image

    with Image.open(path) as im:
        inputs = build_inputs(engine.loaded, IMAGE_ONLY, [im.convert("RGB")])
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == image_token_id(engine.model))[0])
    h = capture_block_output(engine.model, engine.hook_index, inputs)[0]
    acts = engine.sae.encode(h.to(engine.sae.W_dec.dtype)).float()[:, features]
    base = acts[start:start + BASE * BASE].T.reshape(-1, BASE, BASE)
    rows = [start + BASE * BASE + r * (TILES + 1) + c for r in range(TILES) for c in range(TILES)]
    return base, acts[rows].T.reshape(-1, TILES, TILES)


def main(catalog: str, data: str) -> None:
    rows = [json.loads(line) for line in Path(catalog).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("scores")]
    ann = load_annotations(Path(data) / "annotations.json", Path(data))
    engine = build_engine("builtin:scenes-llava-next", "sae_weights/scenes-llava-next", hookpoint="model.layers.15",
                          device="cpu")
    by_image: dict[str, list[int]] = {}
    for r in rows:
        for im in r["top_images"]:
            by_image.setdefault(im["image"], []).append(r["feature"])
    base_ceiling: dict[int, list[float]] = {}
    tile_ceiling: dict[int, list[float]] = {}
    for path, features in by_image.items():
        base, tiles = grids(engine, path, features)
        objects = ann.objects(path)
        for j, f in enumerate(features):
            for grid, out in ((base[j], base_ceiling), (tiles[j], tile_ceiling)):
                act = activation_mask(grid.tolist(), (128, 128))
                out.setdefault(f, []).append(max((iou(act, ann.mask(o)) for o in objects), default=0.0))
    base_mean = float(np.mean([np.mean(v) for v in base_ceiling.values()]))
    tile_mean = float(np.mean([np.mean(v) for v in tile_ceiling.values()]))
    strong = [r["feature"] for r in rows if r["max_activation"] >= 1.0]
    print(json.dumps({"features": len(rows), "images": len(by_image), "ceiling_base": round(base_mean, 4),
                      "ceiling_tiles": round(tile_mean, 4), "strong_features": len(strong),
                      "strong_ceiling_base": round(float(np.mean([np.mean(base_ceiling[f]) for f in strong])), 4),
                      "strong_ceiling_tiles": round(float(np.mean([np.mean(tile_ceiling[f]) for f in strong])), 4)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
