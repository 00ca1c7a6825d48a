"""Which SAE features fire on a prompt: per position, pooled over image and text tokens, and as
per-image patch grids a client can draw as heatmaps. Returns plain Python data."""

from __future__ import annotations

import math

import torch

from .hookpoint import capture_block_output
from .prefill import image_token_id

_CHUNK = 512  # positions encoded at once: bounds the [positions, latents] pre-activation tensor


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of True."""
    runs, start = [], None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def grid_values(acts: torch.Tensor, rows: int, cols: int) -> list[list[float]]:
    """One feature's patch activations ``[rows * cols]`` as the rows x cols lists catalogs store,
    to 3 decimals: a 4,096-feature catalog with grids then stays a few megabytes."""
    return [[round(v, 3) for v in r] for r in acts.reshape(rows, cols).tolist()]


def image_grids(loaded, inputs: dict) -> list[tuple[list[int], int, int]]:
    """For each image, the positions of one patch grid of it (row-major) and the grid's shape:
    LLaVA / LLaVA-NeXT: the base view; Qwen2-VL: the merged patch grid; Idefics3: the global view."""
    model, ids = loaded.model, inputs["input_ids"][0].cpu()
    tok = image_token_id(model)
    if tok is None:
        return []
    runs = _runs(ids == tok)
    if loaded.family == "qwen2-vl":
        merge = model.config.vision_config.spatial_merge_size
        grids = []
        for (start, _), (t, h, w) in zip(runs, inputs["image_grid_thw"].tolist(), strict=False):
            rows, cols = h // merge, w // merge
            grids.append((list(range(start, start + t * rows * cols)), rows, cols))
        return grids
    if loaded.family == "idefics3":
        tag = loaded.tokenizer.convert_tokens_to_ids("<global-img>")
        globals_ = [r for r in runs if r[0] > 0 and int(ids[r[0] - 1]) == tag] or runs
        side = math.isqrt(globals_[0][1] - globals_[0][0]) if globals_ else 0
        return [(list(range(s, s + side * side)), side, side) for s, _ in globals_]
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return [(list(range(s, s + side * side)), side, side) for s, e in runs if e - s >= side * side]


@torch.inference_mode()
def inspect_prompt(engine, inputs: dict, *, top_k: int = 5, features: list[int] | None = None,
                   grid_features: int = 5, positions: bool = True) -> dict:
    sae = engine.sae
    if sae is None:
        raise ValueError("no SAE is loaded")
    model = engine.model
    h = capture_block_output(model, engine.hook_index, inputs)[0].to(sae.W_dec.dtype)
    ids = inputs["input_ids"][0]
    t_len = h.shape[0]
    img_tok = image_token_id(model)
    is_image = (ids == img_tok) if img_tok is not None else torch.zeros_like(ids, dtype=torch.bool)
    m = sae.num_latents
    k_code = sae.k if sae.cfg.activation == "topk" else max(top_k, 64)
    sums = {"image": torch.zeros(m, device=h.device), "text": torch.zeros(m, device=h.device)}
    per_position = []
    tokens = engine.loaded.tokenizer.convert_ids_to_tokens(ids.tolist()) if positions else None
    for start in range(0, t_len, _CHUNK):
        chunk = h[start : start + _CHUNK]
        vals, idx = sae.encode_sparse(chunk, k=None if sae.cfg.activation == "topk" else min(k_code, m))
        vals = vals.float()
        chunk_image = is_image[start : start + _CHUNK]
        for kind, sel in (("image", chunk_image), ("text", ~chunk_image)):
            if sel.any():
                sums[kind].index_add_(0, idx[sel].reshape(-1), vals[sel].reshape(-1))
        if positions:
            top_v, top_i = vals.topk(min(top_k, vals.shape[-1]), dim=-1)
            top_ids = idx.gather(-1, top_i)
            for row in range(chunk.shape[0]):
                p = start + row
                per_position.append({
                    "position": p, "token": tokens[p], "kind": "image" if bool(is_image[p]) else "text",
                    "features": [{"id": int(f), "activation": float(a)}
                                 for f, a in zip(top_ids[row].tolist(), top_v[row].tolist(), strict=True) if a > 0],
                })
    counts = {"image": int(is_image.sum()), "text": int((~is_image).sum())}
    pooled = {}
    for kind, total in sums.items():
        if counts[kind] == 0:
            pooled[kind] = []
            continue
        mean = total / counts[kind]
        v, i = mean.topk(min(top_k, m))
        pooled[kind] = [{"id": int(f), "activation": float(a)} for f, a in zip(i.tolist(), v.tolist(), strict=True)
                        if a > 0]
    chosen = features or [f["id"] for f in pooled["image"][:grid_features]]
    images = []
    for n, (pos, rows, cols) in enumerate(image_grids(engine.loaded, inputs)):
        grid = {}
        if chosen:
            acts = sae.feature_activations(h[pos], chosen).float().cpu()  # [rows*cols, F]
            for j, f in enumerate(chosen):
                grid[str(f)] = acts[:, j].reshape(rows, cols).tolist()
        images.append({"index": n, "rows": rows, "cols": cols, "features": grid})
    return {"num_tokens": t_len, "image_tokens": counts["image"], "text_tokens": counts["text"],
            "positions": per_position if positions else None, "pooled": pooled, "images": images}


def decoder_norms(sae) -> list[float]:
    return sae.W_dec.float().norm(dim=1).tolist()
