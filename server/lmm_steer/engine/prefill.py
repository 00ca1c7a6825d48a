"""Prefill: the model's own forward pass over the prompt (images included), run eagerly.

Using the HF forward keeps every family's image handling (AnyRes tiling, M-RoPE, pixel shuffle)
exact. A forward hook on the hook block applies the request's steering to the positions in its
scope (a request-conditioned edit, ``when``, is decided there first, on the unedited output of
the whole prompt or of its text alone); a pre-hook on the rotary module records the last rotary position, from which decode
continues (for M-RoPE models it is not the token count). The keys and values come back from the
dynamic cache for the static cache to copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hookpoint import block_hidden, language_model, with_block_hidden
from .steering import SteeringRow, SteeringTable, StepVariant, apply_steering, variant_for


@dataclass
class PrefillResult:
    keys: list[torch.Tensor]  # per layer, [kv_heads, T, head_dim]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab], fp32, at the last prompt position
    length: int  # T
    next_rope_pos: int
    steering_row: SteeringRow | None = None  # the row with its ``when`` conditions decided (None: it had none)


def scope_mask(input_ids: torch.Tensor, scope: str, image_token_id: int | None) -> torch.Tensor:
    """Which prompt positions a steering scope covers during prefill, ``[T]`` bool."""
    if scope in ("all", "prompt"):
        return torch.ones_like(input_ids, dtype=torch.bool)
    if scope == "image":
        if image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == image_token_id
    return torch.zeros_like(input_ids, dtype=torch.bool)  # "generated": decode positions only


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        entry = cache.layers[layer]
        return entry.keys, entry.values
    return cache.key_cache[layer], cache.value_cache[layer]  # older Cache API


def image_token_id(model) -> int | None:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def run_prefill(
    model, inputs: dict, *, sae=None, hook_index: int = 0, row: SteeringRow | None = None, scope: str = "all",
    table_width: int = 1,
) -> PrefillResult:
    decoder = language_model(model)
    input_ids = inputs["input_ids"]
    t_len = int(input_ids.shape[1])
    handles = []
    seen_pos: list[int] = []
    decided: dict[str, SteeringRow] = {}

    def record_positions(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if pos is not None:
            seen_pos.append(int(pos.max()))

    handles.append(decoder.rotary_emb.register_forward_pre_hook(record_positions, with_kwargs=True))
    if sae is not None and row is not None and (row.ids or row.paper):
        image_token = image_token_id(model)
        in_scope = scope_mask(input_ids[0], scope, image_token).to(sae.W_dec.device)
        is_text = None if image_token is None else (input_ids[0] != image_token).to(sae.W_dec.device)
        handles.append(decoder.layers[hook_index].register_forward_hook(
            _steering_hook(sae, row, in_scope, max(table_width, len(row.ids), 1), decided, is_text)
        ))
    try:
        with torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    cache = getattr(out, "cache", None)  # transformers >= 5.2x renamed past_key_values to cache
    if cache is None:
        cache = out.past_key_values
    keys, values = [], []
    for layer in range(len(decoder.layers)):
        k, v = _layer_kv(cache, layer)
        keys.append(k[0])
        values.append(v[0])
    next_pos = (max(seen_pos) + 1) if seen_pos else t_len
    return PrefillResult(keys, values, out.logits[0, -1].float(), t_len, next_pos, decided.get("row"))


def _steering_hook(sae, row: SteeringRow, in_scope: torch.Tensor, width: int, decided: dict,
                   is_text: torch.Tensor | None = None):
    t_len = int(in_scope.shape[0])
    which = (~in_scope).long()  # per position: row 0 of the table in scope, row 1 out of scope

    def tables(r: SteeringRow) -> tuple[SteeringTable, StepVariant]:
        table = SteeringTable(2, width, sae.W_dec.device, sae.W_dec.dtype)
        table.write(0, r, True)
        table.write(1, r, False)
        return table, variant_for([(r, bool(in_scope.any()))])

    ready = None if row.conditional else tables(row)

    def hook(module, args, output):
        h = block_hidden(output)
        if ready is None:  # the conditions read the unedited output of the whole prompt, then the edits apply
            decided["row"] = row.decide(sae, h[0], is_text)
            table, variant = tables(decided["row"])
        else:
            table, variant = ready
        steered = apply_steering(
            h[0], sae, table.ids[which], table.delta_a[which], table.delta_b[which], table.paper_c[which],
            table.paper_d[which], table.paper[which], variant, dirs=table.dirs[which], gates=table.gates[which],
        )[None]
        assert steered.shape[1] == t_len
        return with_block_hidden(output, steered)

    return hook
