"""Which SAE features fire on a prompt: per position, pooled over image and text tokens, and as
per-image patch grids a client can draw as heatmaps. Returns plain Python data.

Pooling leaves out, by default, the tokenizer's special tokens (``<|im_start|>``, ``<|eot_id|>``, ...)
and the first position, and the chat template's other text (role names, a system prompt the template
adds: SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face" outnumbers a
short prompt's tokens). The first position is the attention sink: on the scenes model its block-15
output has norm about 26,000 against about 200 elsewhere, so its SAE code (the SAE was trained, and
the catalog built, with that position left out) is off-distribution and would top every text pool;
special tokens carry the chat template, not the prompt. Image tokens are never left out, though an
image placeholder is a special token."""

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


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: its named ones and every added token flagged special (chat
    headers such as ``<|start_header_id|>`` are often only the latter)."""
    out = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            out.add(int(i))
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded alone (" helpful" rather than the BPE piece "Ġhelpful"); a byte that is only
    part of a character decodes to U+FFFD."""
    cache: dict[int, str] = {}
    return [cache[i] if i in cache else cache.setdefault(i, tokenizer.decode([i])) for i in ids]


def template_mask(texts: list[str], special: list[bool], contents: list[str] | None) -> list[bool]:
    """Which positions the chat template put there rather than the messages: special tokens, role
    headers, a default system prompt. ``contents``: the messages' texts in order; each is looked up
    in the decoded prompt after the previous one, and positions overlapping none are the template's.
    Without ``contents``, or when one is not found (a character split across tokens), only special
    tokens are marked."""
    if contents is None:
        return list(special)
    starts, text = [], ""
    for t in texts:
        starts.append(len(text))
        text += t
    spans, cursor = [], 0
    for c in contents:
        c = c.strip()
        if not c:
            continue
        at = text.find(c, cursor)
        if at < 0:
            return list(special)
        spans.append((at, at + len(c)))
        cursor = at + len(c)
    out = []
    for i, (start, t) in enumerate(zip(starts, texts, strict=True)):
        end = start + len(t)
        inside = any(start < b and end > a for a, b in spans)
        out.append(special[i] or not inside)
    return out


def residual_norm(h: torch.Tensor, select: torch.Tensor) -> float | None:
    """Median L2 norm of the block output over the selected positions (None where there are none)."""
    return float(h[select].float().norm(dim=-1).median()) if bool(select.any()) else None


@torch.inference_mode()
def image_residual_norm(engine, inputs: dict) -> float | None:
    """Median norm of the hookpoint's output over the image tokens of ``inputs``: how large the
    residual stream is where an image-scope clamp writes (None without image tokens)."""
    h = capture_block_output(engine.model, engine.hook_index, inputs)[0]
    tok = image_token_id(engine.model)
    if tok is None:
        return None
    return residual_norm(h, inputs["input_ids"][0].to(h.device) == tok)


@torch.inference_mode()
def inspect_prompt(engine, inputs: dict, *, top_k: int = 5, features: list[int] | None = None,
                   grid_features: int = 5, positions: bool = True, include_special_tokens: bool = False,
                   include_template_tokens: bool = False, contents: list[str] | None = None) -> dict:
    """``contents``: the messages' texts, in order, to tell the chat template's positions from theirs
    (``template`` per position). ``include_special_tokens``: pool over special tokens and the first
    position too; ``include_template_tokens``: over the template's other text too (role names, a
    system prompt the template adds)."""
    sae = engine.sae
    if sae is None:
        raise ValueError("no SAE is loaded")
    model = engine.model
    tokenizer = engine.loaded.tokenizer
    h = capture_block_output(model, engine.hook_index, inputs)[0].to(sae.W_dec.dtype)
    ids = inputs["input_ids"][0]
    t_len = h.shape[0]
    img_tok = image_token_id(model)
    is_image = (ids == img_tok) if img_tok is not None else torch.zeros_like(ids, dtype=torch.bool)
    specials = special_ids(tokenizer) - ({img_tok} if img_tok is not None else set())
    id_list = ids.tolist()
    is_special = torch.tensor([i in specials for i in id_list], dtype=torch.bool, device=ids.device)
    texts = token_texts(tokenizer, id_list)
    template = template_mask(texts, [bool(v) for v in is_special.tolist()], contents)
    pooled_mask = torch.ones_like(is_special)
    if not include_special_tokens:
        pooled_mask &= ~is_special
        pooled_mask[0] = bool(is_image[0])  # the attention sink (see the module docstring)
    if not include_template_tokens:
        pooled_mask &= ~torch.tensor(template, dtype=torch.bool, device=ids.device) | is_special | is_image
    m = sae.num_latents
    k_code = sae.k if sae.cfg.activation == "topk" else max(top_k, 64)
    sums = {"image": torch.zeros(m, device=h.device), "text": torch.zeros(m, device=h.device)}
    per_position = []
    tokens = tokenizer.convert_ids_to_tokens(id_list) if positions else None
    for start in range(0, t_len, _CHUNK):
        chunk = h[start : start + _CHUNK]
        vals, idx = sae.encode_sparse(chunk, k=None if sae.cfg.activation == "topk" else min(k_code, m))
        vals = vals.float()
        chunk_image = is_image[start : start + _CHUNK]
        chunk_pooled = pooled_mask[start : start + _CHUNK]
        for kind, sel in (("image", chunk_image & chunk_pooled), ("text", ~chunk_image & chunk_pooled)):
            if sel.any():
                sums[kind].index_add_(0, idx[sel].reshape(-1), vals[sel].reshape(-1))
        if positions:
            top_v, top_i = vals.topk(min(top_k, vals.shape[-1]), dim=-1)
            top_ids = idx.gather(-1, top_i)
            for row in range(chunk.shape[0]):
                p = start + row
                image = bool(is_image[p])
                per_position.append({
                    "position": p, "token": tokens[p], "text": texts[p], "kind": "image" if image else "text",
                    "special": bool(is_special[p]), "template": bool(template[p]) and not image,
                    "pooled": bool(pooled_mask[p]),
                    "features": [{"id": int(f), "activation": float(a)}
                                 for f, a in zip(top_ids[row].tolist(), top_v[row].tolist(), strict=True) if a > 0],
                })
    counts = {"image": int(is_image.sum()), "text": int((~is_image).sum())}
    pooled_counts = {"image": int((is_image & pooled_mask).sum()), "text": int((~is_image & pooled_mask).sum())}
    pooled = {}
    for kind, total in sums.items():
        if pooled_counts[kind] == 0:
            pooled[kind] = []
            continue
        mean = total / pooled_counts[kind]
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
            "pooled_tokens": pooled_counts,
            "residual_norm": {"image": residual_norm(h, is_image & pooled_mask),
                              "text": residual_norm(h, ~is_image & pooled_mask)},
            "positions": per_position if positions else None, "pooled": pooled, "images": images}


def decoder_norms(sae) -> list[float]:
    return sae.W_dec.float().norm(dim=1).tolist()
