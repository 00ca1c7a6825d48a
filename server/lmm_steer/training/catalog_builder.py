"""Automatic feature catalog: for every feature, where it fires most (text windows with the
activating token marked, or the image and its patch grid), how often, and how strongly."""

from __future__ import annotations

import torch

from ..engine.inspect import image_grids
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
    kept_inputs = []
    for ex_index, inputs in enumerate(encoded(loaded, examples, max_len)):
        h, _ = hidden_states(loaded, engine.hook_index, inputs)
        h = h[0, 1:].to(sae.W_dec.dtype)  # skip the attention-sink position, as training does
        kept_inputs.append(inputs)
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
    rows = []
    for f in range(m):
        contexts, images = [], []
        for a, (e, p) in zip(best_act[f].tolist(), best_ref[f].tolist(), strict=True):
            if a <= 0:
                continue
            ex = examples[e]
            if ex.images:
                images.append(_image_entry(engine, kept_inputs[e], ex, f, a))
            else:
                contexts.append({"text": _window(tok, kept_inputs[e]["input_ids"][0], p, window), "activation": a})
        row = {"feature": f, "explanation": "", "density": float(fired[f]) / max(total, 1),
               "max_activation": float(max_act[f]), "top_contexts": contexts}
        if images:
            row["top_images"] = images
        rows.append(row)
    return rows


def _window(tok, ids: torch.Tensor, pos: int, window: int) -> str:
    before = tok.decode(ids[max(0, pos - window) : pos], skip_special_tokens=True)
    at = tok.decode(ids[pos : pos + 1], skip_special_tokens=True)
    after = tok.decode(ids[pos + 1 : pos + 4], skip_special_tokens=True)
    return f"{before}{MARK_OPEN}{at}{MARK_CLOSE}{after}".replace("\n", " ")


def _image_entry(engine, inputs, ex, feature: int, activation: float) -> dict:
    h, _ = hidden_states(engine.loaded, engine.hook_index, inputs)
    grids = image_grids(engine.loaded, inputs)
    entry = {"image": ex.images[0], "activation": activation}
    if grids:
        pos, rows, cols = grids[0]
        acts = engine.sae.feature_activations(h[0, pos].to(engine.sae.W_dec.dtype), [feature]).float()
        entry["grid"] = acts[:, 0].reshape(rows, cols).tolist()
    return entry
