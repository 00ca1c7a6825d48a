"""One decode step for a batch of rows, and its CUDA-graph capture.

The step reuses the model's own modules (norms, projections, MLP, embeddings, head) and replaces
only what a dynamic cache makes uncapturable: attention reads a static KV cache with per-row
positions, rotary angles come from per-row positions held in a buffer, and the SAE edit at the
hook block reads a fixed-shape steering table. Every input lives in a preallocated buffer written
before the step, so a captured graph replays with new tokens, positions and clamps unchanged.
Python ints that vary (batch size, attended length) are graph keys, never baked-in inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hookpoint import language_model
from .kv_cache import StaticKVCache
from .steering import PLAIN, SteeringTable, StepVariant, apply_steering

NON_FINITE = -1  # next_tokens' marker for a row whose logits hold NaN or infinity


def _fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights of linears that read the same input into one matrix, and point each
    module's weight at its slice of it: one GEMM instead of several per step, no extra memory, and
    the model's own forward (used for prefill) still sees the same weights."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    bias = torch.cat([lin.bias.detach() for lin in linears], dim=0) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse projections where only some have a bias")
    offset = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(weight[offset : offset + n], requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias[offset : offset + n], requires_grad=False)
        offset += n
    return weight, bias


@dataclass
class _Block:
    """One decoder block's weights as the decode step uses them: tensors, numbers and one shared
    activation function, so every block calls :func:`block_step` with arguments of the same kinds
    (which lets all blocks share one compiled graph)."""

    norm1: torch.Tensor
    eps1: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def from_layer(cls, layer, act) -> _Block:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_w, qkv_b = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        gu_w, gu_b = _fuse_linears([mlp.gate_proj, mlp.up_proj])
        hd = attn.head_dim
        heads = attn.q_proj.weight.shape[0] // hd
        kv_heads = attn.k_proj.weight.shape[0] // hd

        def eps(norm):
            return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        return cls(
            layer.input_layernorm.weight, eps(layer.input_layernorm), qkv_w, qkv_b, attn.o_proj.weight,
            attn.o_proj.bias, layer.post_attention_layernorm.weight, eps(layer.post_attention_layernorm), gu_w,
            gu_b, mlp.down_proj.weight, mlp.down_proj.bias, act, heads, kv_heads, hd, float(attn.scaling),
        )


def _shared_activation(layers) -> Callable[[torch.Tensor], torch.Tensor]:
    """The blocks' MLP activation as one callable. transformers builds a new module per block; they
    are stateless and alike, and a compiled step would guard on (and recompile for) each distinct
    object. SiLU, the Llama/Qwen2 one, becomes ``F.silu``."""
    acts = [layer.mlp.act_fn for layer in layers]
    first = acts[0]
    if any(type(a) is not type(first) or repr(a) != repr(first) for a in acts[1:]):
        raise ValueError("decoder blocks with different MLP activations are not supported")
    return F.silu if isinstance(first, torch.nn.SiLU) else first


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The Llama/Qwen2 RMSNorm in one call (computed in fp32 inside); HF rounds once more, between
    # normalising and scaling, which differs by at most one unit in the last place.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _linear_residual(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``residual + linear(x)`` with the add done in the GEMM's epilogue (one kernel, not two)."""
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out + bias


def block_step(h, cos, sin, mask, rows, pos, keys, values, attend_len: int, blk: _Block) -> torch.Tensor:
    """One decoder block for one new token per row: writes the rows' keys and values at ``pos``
    and returns the block's output ``[b, D]``. It reads nothing but its arguments and writes
    nothing but the two cache tensors, so ``torch.compile`` can fuse its elementwise work into few
    kernels."""
    b, nh, nkv, hd = h.shape[0], blk.heads, blk.kv_heads, blk.head_dim
    qkv = F.linear(_rms_norm(h, blk.norm1, blk.eps1), blk.qkv_w, blk.qkv_b).view(b, nh + 2 * nkv, hd)
    qk = qkv[:, : nh + nkv]
    qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)  # rotary on q and k at once
    # Grouped-query attention as plain attention: the nh/nkv query heads sharing a key head
    # become that head's "query positions", so every SDPA backend applies.
    q = qk[:, :nh].reshape(b, nkv, nh // nkv, hd)
    keys[rows, :, pos] = qk[:, nh:]
    values[rows, :, pos] = qkv[:, nh + nkv :]
    o = F.scaled_dot_product_attention(
        q, keys[:b, :, :attend_len], values[:b, :, :attend_len], attn_mask=mask, scale=blk.scaling
    )
    h = _linear_residual(h, o.reshape(b, nh * hd), blk.o_w, blk.o_b)
    gate, up = F.linear(_rms_norm(h, blk.norm2, blk.eps2), blk.gate_up_w, blk.gate_up_b).chunk(2, dim=-1)
    return _linear_residual(h, blk.act(gate) * up, blk.down_w, blk.down_b)


def steer_by_count(h, sae, ids, delta_a, delta_b, paper_c, paper_d, paper, variant: StepVariant, effect, dirs,
                   gates):
    """:func:`apply_steering` ranking clamped features by counting at every batch size. Compiled, the
    comparison fuses into its sum: one pass over the pre-activations and no ``[b, C, M]`` tensor,
    where eager steps from batch 8 on pay for a top-k selection over 131072 latents instead."""
    return apply_steering(h, sae, ids, delta_a, delta_b, paper_c, paper_d, paper, variant, effect,
                          rank_by_count=True, dirs=dirs, gates=gates)


@functools.cache
def compile_once(fn: Callable) -> Callable:
    """``fn`` through ``torch.compile``, built once per process and shared by every caller: every
    block calls :func:`block_step` with tensors of the same kinds, so all blocks share one graph per
    shape (batch and attended length become symbolic after their first change, as torch.compile
    does), and every engine shares the steering graphs."""
    return torch.compile(fn)


class DecodeStep:
    def __init__(self, model, sae, hook_index: int, cache: StaticKVCache, table_width: int,
                 compiled: bool = False) -> None:
        self.decoder = language_model(model)
        # Fusing re-points the model's weights, so it happens once per model; engines share it.
        if not hasattr(self.decoder, "_lmm_steer_blocks"):
            act = _shared_activation(self.decoder.layers)
            self.decoder._lmm_steer_blocks = [_Block.from_layer(layer, act) for layer in self.decoder.layers]
        self.blocks = self.decoder._lmm_steer_blocks
        self.block_step = compile_once(block_step) if compiled else block_step
        self.steer = compile_once(steer_by_count) if compiled else apply_steering
        self.lm_head = model.get_output_embeddings()
        self.sae, self.hook_index, self.cache = sae, hook_index, cache
        weight = self.lm_head.weight
        device, self.dtype = weight.device, weight.dtype
        rows = cache.rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_pos = torch.zeros(rows, dtype=torch.long, device=device)  # where this token's K/V go
        self.rope_pos = torch.zeros(rows, dtype=torch.long, device=device)  # its rotary position
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=device)  # greedy choice of this step
        self.row_index = torch.arange(rows, device=device)
        self.key_index = torch.arange(cache.max_len, device=device)
        table_dtype = sae.W_dec.dtype if sae is not None else self.dtype
        self.table = SteeringTable(rows, table_width, device, table_dtype)
        # a measuring step's activations of each row's edited features, before and after the edit
        self.effect = torch.zeros(2, rows, table_width, device=device, dtype=table_dtype)
        rotary = self.decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def __call__(self, batch: int, attend_len: int, variant: StepVariant = PLAIN) -> torch.Tensor:
        """Logits ``[batch, vocab]`` (fp32) for rows ``0..batch-1``; attends to keys ``< attend_len``."""
        b, cache, t = batch, self.cache, self.table
        rows = self.row_index[:b]
        pos = self.write_pos[:b]
        angles = self.rope_pos[:b, None].float() * self.inv_freq[None, :]
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: fold the sign into the table once
        cos = (torch.cat((angles, angles), dim=-1).cos() * self.rope_scale).to(self.dtype)[:, None, :]
        sin = angles.sin() * self.rope_scale
        sin = torch.cat((-sin, sin), dim=-1).to(self.dtype)[:, None, :]  # [b, 1, head_dim]
        mask = (self.key_index[None, :attend_len] <= pos[:, None])[:, None, None, :]  # [b, 1, 1, L]
        h = self.decoder.embed_tokens(self.tokens[:b])  # [b, D]
        for i, blk in enumerate(self.blocks):
            h = self.block_step(h, cos, sin, mask, rows, pos, cache.keys[i], cache.values[i], attend_len, blk)
            if i == self.hook_index and not variant.plain:
                h = self.steer(
                    h, self.sae, t.ids[:b], t.delta_a[:b], t.delta_b[:b], t.paper_c[:b], t.paper_d[:b],
                    t.paper[:b], variant, self.effect[:, :b], dirs=t.dirs[:b], gates=t.gates[:b],
                )
        logits = self.lm_head(self.decoder.norm(h)).float()
        # Advance the inputs on the device, assuming every row greedy: a batch of greedy rows then
        # needs no host-to-device copy between steps (the engine overwrites sampled rows' tokens,
        # and rewrites everything when the batch changes).
        torch.argmax(logits, dim=-1, out=self.next_tokens[:b])
        self.tokens[:b].copy_(self.next_tokens[:b])
        # A row whose logits are not all finite reports token -1, read back with the tokens at no
        # extra sync: the engine fails that request alone (its neighbours' rows are independent).
        self.next_tokens[:b].masked_fill_(~torch.isfinite(logits).all(-1), NON_FINITE)
        self.write_pos[:b].add_(1)
        self.rope_pos[:b].add_(1)
        return logits


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
        # step advances its own inputs (tokens, positions), so they are saved before the
        # warm-up and restored after it; the keys and values the warm-up wrote lie beyond the
        # rows' positions, masked until the real steps overwrite them.
        step = self.step
        saved = [buf.clone() for buf in (step.tokens, step.write_pos, step.rope_pos)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                step(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = step(*key)
        for buf, value in zip((step.tokens, step.write_pos, step.rope_pos), saved, strict=True):
            buf.copy_(value)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, out)
        self.captures += 1
        return graph, out
