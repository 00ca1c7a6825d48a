"""Automatic feature catalog: for every feature, where it fires most (text windows with the
activating token marked, or the image and its patch grid), how often, and how strongly."""

from __future__ import annotations

import torch

from ..engine.inspect import grid_values, image_grids
from .activations import encoded, hidden_states

MARK_OPEN, MARK_CLOSE = "«", "»"


@torch.inference_mode()
def build_catalog(engine, examples, *, top: int = 8, window: int = 12, max_len: int = 128) -> list[dict]:
    sae, loaded = engine.sae, engine.loaded
    tok = loaded.tokenizer
    m = sae.num_latents
    fired = torch.zeros(m, dtype=torch.long)
    max_act = torch.zeros(m)
    # best (activation, example, position) per feature, merged batch by batch
    best_act = torch.full((m, top), -1.0)
    best_ref = torch.full((m, top, 2), -1, dtype=torch.long)
    total = 0
    kept = []  # (example, inputs) of every example the model could take; refs index into this
    for ex in examples:
        inputs = next(encoded(loaded, [ex], max_len), None)
        if inputs is None:  # e.g. an image example for a text-only model
            continue
        ex_index = len(kept)
        kept.append((ex, inputs))
        h, _ = hidden_states(loaded, engine.hook_index, inputs)
        h = h[0, 1:].to(sae.W_dec.dtype)  # skip the attention-sink position, as training does
        vals, idx = sae.encode_sparse(h)
        vals, idx = vals.float().cpu(), idx.cpu()
        active = vals > 0
        total += h.shape[0]
        fired.index_add_(0, idx[active], torch.ones(int(active.sum()), dtype=torch.long))
        flat_f, flat_v = idx[active], vals[active]
        flat_p = torch.arange(h.shape[0])[:, None].expand_as(idx)[active] + 1
        max_act.scatter_reduce_(0, flat_f, flat_v, reduce="amax")
        # per feature keep this example's strongest position, then merge into the running top list
        strongest = torch.full((m,), -1.0).scatter_reduce(0, flat_f, flat_v, reduce="amax")
        hit = strongest > 0
        if not hit.any():
            continue
        pos = torch.zeros(m, dtype=torch.long)
        is_max = flat_v == strongest[flat_f]
        pos[flat_f[is_max]] = flat_p[is_max]
        cand_act = torch.cat([best_act, strongest[:, None]], dim=1)
        cand_ref = torch.cat([best_ref, torch.stack([torch.full((m,), ex_index), pos], 1)[:, None]], dim=1)
        order = cand_act.argsort(dim=1, descending=True)[:, :top]
        best_act = cand_act.gather(1, order)
        best_ref = cand_ref.gather(1, order[..., None].expand(-1, -1, 2))
    grids = _image_grids(engine, kept, best_act, best_ref)
    rows = []
    for f in range(m):
        contexts, images = [], []
        for a, (e, p) in zip(best_act[f].tolist(), best_ref[f].tolist(), strict=True):
            if a <= 0:
                continue
            ex, inputs = kept[e]
            if ex.images:
                entry = {"image": ex.images[0], "activation": a}
                if (e, f) in grids:
                    entry["grid"] = grids[e, f]
                images.append(entry)
            else:
                contexts.append({"text": _window(tok, inputs["input_ids"][0], p, window), "activation": a})
        row = {"feature": f, "explanation": "", "density": float(fired[f]) / max(total, 1),
               "max_activation": float(max_act[f]), "top_contexts": contexts}
        if images:
            row["top_images"] = images
        rows.append(row)
    return rows


def _image_grids(engine, kept, best_act, best_ref) -> dict[tuple[int, int], list]:
    """Patch grids for every (image example, feature) pair in the top lists, running the model once
    per image example rather than once per pair."""
    wanted: dict[int, list[int]] = {}
    for f, (acts, refs) in enumerate(zip(best_act.tolist(), best_ref.tolist(), strict=True)):
        for a, (e, _) in zip(acts, refs, strict=True):
            if a > 0 and kept[e][0].images:
                wanted.setdefault(e, []).append(f)
    out = {}
    for e, features in wanted.items():
        inputs = kept[e][1]
        found = image_grids(engine.loaded, inputs)
        if not found:
            continue
        pos, rows, cols = found[0]
        h, _ = hidden_states(engine.loaded, engine.hook_index, inputs)
        acts = engine.sae.feature_activations(h[0, pos].to(engine.sae.W_dec.dtype), features).float()
        for j, f in enumerate(features):
            out[e, f] = grid_values(acts[:, j], rows, cols)
    return out


def _window(tok, ids: torch.Tensor, pos: int, window: int) -> str:
    before = tok.decode(ids[max(0, pos - window) : pos], skip_special_tokens=True)
    at = tok.decode(ids[pos : pos + 1], skip_special_tokens=True)
    after = tok.decode(ids[pos + 1 : pos + 4], skip_special_tokens=True)
    return f"{before}{MARK_OPEN}{at}{MARK_CLOSE}{after}".replace("\n", " ")
