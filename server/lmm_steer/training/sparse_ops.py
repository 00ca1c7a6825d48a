"""The two TopK SAE operations with sparse backward passes.

Only the encoder's forward matmul is dense. Every gradient touches just the k chosen latents per
token: weight gradients are sparse (CSR) x dense products and the gradient of the chosen
activations is a sampled dense-dense product (``torch.sparse.sampled_addmm``), so no
``[batch, k, d]`` tensor is ever built.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


def row_topk(x: torch.Tensor, k: int, slab_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1, sorted=False)`` by exact group pruning (the same set, up to ties), in row
    slabs of about ``slab_bytes`` on a CPU: the pruning reads each slab twice, the second time from
    cache (10% faster at k 128 on a [4096, 32768] matrix, no change at k 32)."""
    rows = max(1, slab_bytes // max(1, x.shape[1] * x.element_size()))
    if x.device.type == "cuda" or x.shape[0] <= rows:
        return _pruned_topk(x, k)
    vals = x.new_empty(x.shape[0], k)
    idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        vals[i:i + rows], idx[i:i + rows] = _pruned_topk(x[i:i + rows], k)
    return vals, idx


def _pruned_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group pruning behind :func:`row_topk`.

    PyTorch's CPU top-k partially sorts every row: ~2 ns per element, a fifth of a training step.
    Split each row into ``g`` strided groups; the k groups with the largest maxima hold all of the
    row's k largest values (any other group's maximum is beaten by k distinct group maxima), so the
    top-k runs on ``k * g`` candidates. The group maxima are one vectorised pass. Both the choice of
    groups and the candidates' top-k recurse while it pays (pruning the choice of groups too saved
    about 10 ms of ~150 ms on [4096, 32768] at k 32 and 128). On CUDA, torch.topk is a radix select and is used as is.
    """
    b, m = x.shape
    g = 1
    while g * 2 <= math.sqrt(m / k) and m % (g * 2) == 0:
        g *= 2
    if x.device.type == "cuda" or g < 4:
        return x.topk(k, dim=-1, sorted=False)
    n = m // g  # group c holds columns c, c + n, c + 2n, ...: reducing over g contiguous slices vectorises
    groups = x.view(b, g, n)
    _, top_groups = _pruned_topk(groups.amax(1), k)
    candidates = groups.gather(2, top_groups.unsqueeze(1).expand(b, g, k)).reshape(b, g * k)
    vals, j = _pruned_topk(candidates, k)
    return vals, top_groups.gather(-1, j % k) + torch.div(j, k, rounding_mode="floor") * n


@dataclass(frozen=True)
class LatentMajor:
    """Where each entry of a ``[B, k]`` selection goes in the transposed ``[M, B]`` CSR layout that
    the backward's sparse kernels want: entries sorted by latent, then token, by one stable argsort
    (no coalescing of 2-D indices). Computed once per selection and shared by encoder and decoder."""

    crow: torch.Tensor
    cols: torch.Tensor  # the token of each entry
    order: torch.Tensor  # permutation from ``idx.reshape(-1)`` to the layout
    shape: tuple[int, int]

    @classmethod
    def of(cls, idx: torch.Tensor, num_latents: int) -> LatentMajor:
        b, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(num_latents + 1, dtype=torch.long, device=idx.device)
        torch.cumsum(torch.bincount(flat, minlength=num_latents), 0, out=crow[1:])
        return cls(crow, torch.div(order, k, rounding_mode="floor"), order, (num_latents, b))

    def csr(self, vals: torch.Tensor) -> torch.Tensor:
        """The ``[M, B]`` sparse matrix holding ``vals`` (shaped like the selection)."""
        return torch.sparse_csr_tensor(self.crow, self.cols, vals.reshape(-1)[self.order], self.shape,
                                       check_invariants=False)


class TopKEncode(torch.autograd.Function):
    """``x -> (values, ids, aux values, aux ids, layout)`` of TopK(ReLU(W_enc x + b_enc)), with the
    AuxK selection among ``dead`` latents when asked and the selection's :class:`LatentMajor` layout
    (pass it on to :class:`SparseDecode`). Gradients flow to W_enc and b_enc through the selected
    entries only."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, k: int, dead: torch.Tensor | None, k_aux: int, workspace=None,
                w_grad=None):
        # The one dense matmul. Writing it into a reused workspace matters on a CPU: a fresh
        # [batch, latents] tensor every step costs as much in page faults as a third of the matmul.
        shape = (x.shape[0], w_enc.shape[0])
        if workspace is not None and workspace.shape == shape and workspace.dtype == x.dtype:
            pre = torch.addmm(b_enc, x, w_enc.t(), out=workspace)
        else:
            pre = torch.addmm(b_enc, x, w_enc.t())
        # TopK then ReLU on the k chosen values equals TopK of ReLU, without a pass over [B, M]
        vals, idx = row_topk(pre, k)
        vals = vals.clamp_min(0)
        if dead is not None and k_aux > 0:
            masked = pre.masked_fill_(~dead, float("-inf"))  # pre is not needed after this
            aux_vals, aux_idx = row_topk(masked, k_aux)
            aux_vals = aux_vals.clamp_min(0)  # rows with fewer dead latents than k_aux pick -inf
            aux_idx = torch.where(torch.isfinite(masked.gather(-1, aux_idx)), aux_idx, idx[:, :1].expand_as(aux_idx))
        else:
            aux_vals = x.new_zeros(x.shape[0], 0)
            aux_idx = idx.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x, idx, vals, aux_idx, aux_vals)
        ctx.num_latents = w_enc.shape[0]
        ctx.w_grad = w_grad
        ctx.layout = LatentMajor.of(idx, w_enc.shape[0])
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx, ctx.layout

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx, _g_layout=None):
        x, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        # ReLU: no gradient where the selected value is 0
        g = torch.where(vals > 0, g_vals, torch.zeros_like(g_vals))
        m, layout = ctx.num_latents, ctx.layout
        if aux_idx.shape[1] and g_aux is not None:
            g_aux = torch.where(aux_vals > 0, g_aux, torch.zeros_like(g_aux))
            idx = torch.cat([idx, aux_idx], dim=1)
            g = torch.cat([g, g_aux], dim=1)
            layout = LatentMajor.of(idx, m)
        g_t = layout.csr(g)  # [M, B]
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 inputs accumulate in fp32
        grad_b = torch.zeros(m, dtype=acc, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1).to(acc))
        if ctx.w_grad is not None:
            # straight into the caller's gradient buffer: a fresh [M, D] result costs several times
            # the sparse product itself (allocation, zero fill and copy)
            torch.addmm(ctx.w_grad, g_t.to(acc), x.to(acc), beta=0.0, out=ctx.w_grad)
            return None, None, grad_b, None, None, None, None, None
        return None, torch.sparse.mm(g_t.to(acc), x.to(acc)), grad_b, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """``(values, ids) -> sum_j values_j W_dec[ids_j]`` with gradients to the values and W_dec."""

    @staticmethod
    def forward(ctx, vals, idx, w_dec, w_grad=None, layout: LatentMajor | None = None, overwrite: bool = False):
        ctx.save_for_backward(vals, idx, w_dec)
        # when given, the W_dec gradient is added into w_grad (zeroed by the caller), or written over
        # it with ``overwrite`` (the only decode in the graph: saves zeroing [M, D] every step)
        ctx.w_grad, ctx.beta = w_grad, 0.0 if overwrite else 1.0
        ctx.layout = layout  # the selection's layout when the encoder already built it
        return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_out):
        vals, idx, w_dec = ctx.saved_tensors
        b, k = idx.shape
        if k == 0:
            return torch.zeros_like(vals), None, None, None, None, None
        layout = ctx.layout or LatentMajor.of(idx, w_dec.shape[0])
        codes = layout.csr(vals)
        # sampled dense-dense product <W_dec[m], g_out[b]> only where the code is non-zero, in the
        # latent-major layout: each decoder row is read once (twice as fast as token-major on a CPU)
        pattern = torch.sparse_csr_tensor(codes.crow_indices(), codes.col_indices(),
                                          torch.zeros(b * k, dtype=g_out.dtype, device=idx.device),
                                          codes.shape, check_invariants=False)
        by_latent = torch.sparse.sampled_addmm(pattern, w_dec.to(g_out.dtype), g_out.t(), beta=0.0).values()
        g_vals = torch.empty_like(by_latent).index_copy_(0, layout.order, by_latent).reshape(b, k)
        if ctx.w_grad is not None:
            torch.addmm(ctx.w_grad, codes, g_out, beta=ctx.beta, out=ctx.w_grad)
            return g_vals.to(vals.dtype), None, None, None, None, None
        return g_vals.to(vals.dtype), None, torch.sparse.mm(codes, g_out), None, None, None
