"""The two TopK SAE operations with sparse backward passes.

Only the encoder's forward matmul is dense. Every gradient touches just the k chosen latents per
token: weight gradients are sparse (CSR) x dense products and the gradient of the chosen
activations is a sampled dense-dense product (``torch.sparse.sampled_addmm``), so no
``[batch, k, d]`` tensor is ever built.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)



def _csr_t(idx: torch.Tensor, vals: torch.Tensor, num_latents: int) -> torch.Tensor:
    """The transposed sparse code, ``[M, B]``, as CSR: entries sorted by latent with one stable
    argsort (no coalescing of 2-D indices)."""
    b, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_latents)
    crow = torch.zeros(num_latents + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    cols = torch.div(order, k, rounding_mode="floor")  # the token each entry came from
    return torch.sparse_csr_tensor(crow, cols, vals.reshape(-1)[order], (num_latents, b), check_invariants=False)


def _by_latent(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's selection by latent id (the CSR layout the backward's sparse kernels want)."""
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx


class TopKEncode(torch.autograd.Function):
    """``x -> (values, ids)`` of TopK(ReLU(W_enc x + b_enc)); optionally also the AuxK selection
    among ``dead`` latents. Gradients flow to W_enc and b_enc through the selected entries only."""

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
        vals, idx = _by_latent(*pre.topk(k, dim=-1, sorted=False))
        vals = vals.clamp_min(0)
        if dead is not None and k_aux > 0:
            masked = pre.masked_fill_(~dead, float("-inf"))  # pre is not needed after this
            aux_vals, aux_idx = masked.topk(k_aux, dim=-1, sorted=False)
            aux_vals = aux_vals.clamp_min(0)  # rows with fewer dead latents than k_aux pick -inf
            aux_idx = torch.where(torch.isfinite(masked.gather(-1, aux_idx)), aux_idx, idx[:, :1].expand_as(aux_idx))
            aux_vals, aux_idx = _by_latent(aux_vals, aux_idx)
        else:
            aux_vals = x.new_zeros(x.shape[0], 0)
            aux_idx = idx.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x, idx, vals, aux_idx, aux_vals)
        ctx.num_latents = w_enc.shape[0]
        ctx.w_grad = w_grad
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        # ReLU: no gradient where the selected value is 0
        g = torch.where(vals > 0, g_vals, torch.zeros_like(g_vals))
        if aux_idx.shape[1] and g_aux is not None:
            g_aux = torch.where(aux_vals > 0, g_aux, torch.zeros_like(g_aux))
            idx = torch.cat([idx, aux_idx], dim=1)
            g = torch.cat([g, g_aux], dim=1)
        m = ctx.num_latents
        g_t = _csr_t(idx, g, m)  # [M, B]
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
    def forward(ctx, vals, idx, w_dec, w_grad=None):
        ctx.save_for_backward(vals, idx, w_dec)
        ctx.w_grad = w_grad  # when given, the W_dec gradient is added into it (zeroed by the caller)
        return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_out):
        vals, idx, w_dec = ctx.saved_tensors
        b, k = idx.shape
        if k == 0:
            return torch.zeros_like(vals), None, None, None
        # sampled dense-dense product: <g_out[b], W_dec[idx[b, j]]> only where the code is non-zero
        crow = torch.arange(0, b * k + 1, k, device=idx.device)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(b * k, dtype=g_out.dtype, device=idx.device),
                                          (b, w_dec.shape[0]), check_invariants=False)
        g_vals = torch.sparse.sampled_addmm(pattern, g_out, w_dec.t().to(g_out.dtype), beta=0.0).values().reshape(b, k)
        codes = _csr_t(idx, vals, w_dec.shape[0])
        if ctx.w_grad is not None:
            torch.addmm(ctx.w_grad, codes, g_out, out=ctx.w_grad)
            return g_vals.to(vals.dtype), None, None, None
        return g_vals.to(vals.dtype), None, torch.sparse.mm(codes, g_out), None
