"""Static KV cache: one preallocated tensor per layer, rows = concurrent sequences.

Shapes never change after construction, which is what lets decode steps be captured as CUDA
graphs. Active sequences occupy rows 0..n-1; when one leaves, the last row moves into its place
(only the filled prefix is copied), so a batch-size bucket is always a prefix of the rows.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (rows, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.max_len = rows, max_len

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a prefill's per-layer ``[kv_heads, T, head_dim]`` tensors into ``row``."""
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            t = k.shape[-2]
            self.keys[layer][row, :, :t].copy_(k)
            self.values[layer][row, :, :t].copy_(v)

    def move(self, src: int, dst: int, length: int) -> None:
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length].copy_(cache[src, :, :length])

    def scrub(self, row: int) -> None:
        """Zero ``row``. Masked-out positions still enter attention as 0 x value, and 0 x NaN is NaN:
        a row whose request went non-finite must not pass its NaN to the row's next occupant."""
        for cache in (*self.keys, *self.values):
            cache[row].zero_()
