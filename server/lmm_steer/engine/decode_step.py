"""One decode step for a batch of rows, and its CUDA-graph capture.

The step reuses the model's own modules (norms, projections, MLP, embeddings, head) and replaces
only what a dynamic cache makes uncapturable: attention reads a static KV cache with per-row
positions, rotary angles come from per-row positions held in a buffer, and the SAE edit at the
hook block reads a fixed-shape steering table. Every input lives in a preallocated buffer written
before the step, so a captured graph replays with new tokens, positions and clamps unchanged.
Python ints that vary (batch size, attended length) are graph keys, never baked-in inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hookpoint import language_model
from .kv_cache import StaticKVCache
from .steering import PLAIN, SteeringTable, StepVariant, apply_steering


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    def __init__(self, model, sae, hook_index: int, cache: StaticKVCache, table_width: int) -> None:
        self.decoder = language_model(model)
        self.lm_head = model.get_output_embeddings()
        self.sae, self.hook_index, self.cache = sae, hook_index, cache
        weight = self.lm_head.weight
        device, self.dtype = weight.device, weight.dtype
        rows = cache.rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_pos = torch.zeros(rows, dtype=torch.long, device=device)  # where this token's K/V go
        self.rope_pos = torch.zeros(rows, dtype=torch.long, device=device)  # its rotary position
        self.row_index = torch.arange(rows, device=device)
        self.key_index = torch.arange(cache.max_len, device=device)
        table_dtype = sae.W_dec.dtype if sae is not None else self.dtype
        self.table = SteeringTable(rows, table_width, device, table_dtype)
        rotary = self.decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def __call__(self, batch: int, attend_len: int, variant: StepVariant = PLAIN) -> torch.Tensor:
        """Logits ``[batch, vocab]`` (fp32) for rows ``0..batch-1``; attends to keys ``< attend_len``."""
        b, cache = batch, self.cache
        rows = self.row_index[:b]
        pos = self.write_pos[:b]
        angles = self.rope_pos[:b, None].float() * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # [b, 1, 1, head_dim]
        cos = (angles.cos() * self.rope_scale).to(self.dtype)
        sin = (angles.sin() * self.rope_scale).to(self.dtype)
        mask = (self.key_index[None, :attend_len] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, L]
        h = self.decoder.embed_tokens(self.tokens[:b])[:, None, :]  # [b, 1, D]
        t = self.table
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            hd = attn.head_dim
            q = attn.q_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = cache.keys[i], cache.values[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            o = F.scaled_dot_product_attention(
                q, kc[:b, :, :attend_len], vc[:b, :, :attend_len], attn_mask=mask, scale=attn.scaling,
                enable_gqa=True,
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i == self.hook_index and not variant.plain:
                h = apply_steering(
                    h[:, 0], self.sae, t.ids[:b], t.delta_a[:b], t.delta_b[:b], t.paper_c[:b], t.paper_d[:b],
                    t.paper[:b], variant,
                )[:, None]
        h = self.decoder.norm(h)
        return self.lm_head(h[:, 0]).float()


class CUDAGraphDecoder:
    """Captures ``DecodeStep`` once per (batch bucket, length bucket, variant), all graphs sharing one
    memory pool, and replays them. Capture happens on first use (or in ``warmup``)."""

    def __init__(self, step: DecodeStep) -> None:
        self.step = step
        self.graphs: dict[tuple[int, int, StepVariant], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.replays = 0
        self.captures = 0

    def __call__(self, batch: int, attend_len: int, variant: StepVariant) -> torch.Tensor:
        key = (batch, attend_len, variant)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key)
        graph, out = entry
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, key):
        # Warm up on a side stream (lazy initialisation, cuBLAS workspaces), then capture. The
        # warm-up runs the real step on the real buffers, which is idempotent: replay rewrites the
        # same keys and values at the same positions.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self.step(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = self.step(*key)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, out)
        self.captures += 1
        return graph, out
