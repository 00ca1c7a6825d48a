"""The images that activate each feature most, as the paper ranks them: by the mean of the
feature's activation over the image's base-grid patch tokens, with the image shown alone."""

from __future__ import annotations

import torch
from PIL import Image

from ..engine.hookpoint import capture_block_output
from ..engine.inspect import grid_values, image_grids
from ..models.inputs import build_inputs

IMAGE_ONLY = [{"role": "user", "content": [{"type": "image"}]}]


@torch.inference_mode()
def patch_activations(engine, image_path, messages=IMAGE_ONLY) -> tuple[torch.Tensor, int, int]:
    """``[rows * cols, latents]`` SAE activations on the first image's base-grid patches, and the grid
    shape. ``messages`` holds one image placeholder (the paper shows the image alone)."""
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    inputs = build_inputs(engine.loaded, messages, [image])
    inputs = {k: v.to(engine.model.device) for k, v in inputs.items()}
    (positions, rows, cols), *_ = image_grids(engine.loaded, inputs)
    h = capture_block_output(engine.model, engine.hook_index, inputs)[0][positions]
    sae = engine.sae
    return sae.encode(h.to(sae.W_dec.dtype)).float().cpu(), rows, cols


def top_images(engine, images: list[str], top: int = 5, progress=None) -> dict[int, list[dict]]:
    """``feature -> [{"image", "score", "grid"}]``, best first, for every feature whose mean patch
    activation is positive on some image. Two passes: rank by the mean, then keep the grids of the
    (image, feature) pairs that made a top list (holding every grid would not fit)."""
    m = engine.sae.num_latents
    best = torch.full((m, top), -1.0)
    ref = torch.full((m, top), -1, dtype=torch.long)
    for i, path in enumerate(images):
        acts, _, _ = patch_activations(engine, path)
        score = torch.cat([best, acts.mean(0)[:, None]], 1)
        refs = torch.cat([ref, torch.full((m, 1), i)], 1)
        order = score.argsort(1, descending=True)[:, :top]
        best, ref = score.gather(1, order), refs.gather(1, order)
        if progress:
            progress("rank", i + 1, len(images))
    wanted: dict[int, list[int]] = {}
    for f, (scores, refs) in enumerate(zip(best.tolist(), ref.tolist(), strict=True)):
        for s, i in zip(scores, refs, strict=True):
            if s > 0:
                wanted.setdefault(i, []).append(f)
    grids: dict[tuple[int, int], list] = {}
    for n, (i, features) in enumerate(sorted(wanted.items())):
        acts, rows, cols = patch_activations(engine, images[i])
        for f in features:
            grids[i, f] = grid_values(acts[:, f], rows, cols)
        if progress:
            progress("grids", n + 1, len(wanted))
    out: dict[int, list[dict]] = {}
    for f, (scores, refs) in enumerate(zip(best.tolist(), ref.tolist(), strict=True)):
        rows = [{"image": images[i], "score": round(s, 6), "grid": grids[i, f]}
                for s, i in zip(scores, refs, strict=True) if s > 0]
        if rows:
            out[f] = rows
    return out


def peak_patch(images: list[dict]) -> float:
    """The largest patch activation in these top images' grids."""
    return max((v for im in images for row in im["grid"] for v in row), default=0.0)
