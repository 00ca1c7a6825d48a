"""Sparse autoencoders as served: TopK (sparsify / the paper), JumpReLU and standard ReLU.

One module covers all three because they differ only in the nonlinearity applied to the
pre-activations; the parameters and the decoder are the same:

    pre   = W_enc (x - b_dec) + b_enc          (b_dec subtracted only if ``apply_b_dec_to_input``)
    topk:      z = TopK(ReLU(pre), k)
    jumprelu:  z = ReLU(pre) * (pre > threshold)
    relu:      z = ReLU(pre)
    x_hat = W_dec^T z + b_dec

``W_enc`` is kept as ``[M, D]`` (sparsify's ``encoder.weight``), so selecting the encoder rows of a
few features is a cheap row gather.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("topk", "jumprelu", "relu")


@dataclass
class SAEConfig:
    d_in: int
    num_latents: int
    activation: str = "topk"
    k: int | None = None
    apply_b_dec_to_input: bool = True
    hookpoint: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.d_in <= 0 or self.num_latents <= 0:
            raise ValueError(f"d_in and num_latents must be positive, got {self.d_in}, {self.num_latents}")
        if self.activation == "topk":
            if self.k is None or not 0 < self.k <= self.num_latents:
                raise ValueError(f"topk SAE needs 0 < k <= num_latents ({self.num_latents}), got k={self.k}")

    def to_dict(self) -> dict:
        return asdict(self)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        # the cfg.json this SAE was read from, as written (None when built here): what the source knew
        # beyond this config (model_name, dataset, ...), kept by ``save_sae`` in the SAELens layout
        self.source_cfg: dict | None = None
        m, d = cfg.num_latents, cfg.d_in
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(m, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(m, **kw))
        self.W_dec = nn.Parameter(torch.zeros(m, d, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d, **kw))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(m, **kw))
        else:
            self.register_parameter("threshold", None)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def k(self) -> int | None:
        return self.cfg.k

    # -- encoding ---------------------------------------------------------------------------

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc (x - b_dec) + b_enc`` over all latents, before any nonlinearity."""
        return F.linear(self._centered(x), self.W_enc, self.b_enc)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        act = self.cfg.activation
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            return F.relu(pre) * (pre > self.threshold)
        vals, idx = torch.topk(F.relu(pre), self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations ``z`` of shape ``[..., M]``."""
        return self._activate(self.pre_activations(x))

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest activations and their latent ids, each ``[..., k]``.

        For a TopK SAE ``k`` defaults to the SAE's own k and gives exactly its code; for the
        other activations ``k`` is required (it is a view of the dense code, not a new code).
        """
        if k is None:
            if self.cfg.activation != "topk":
                raise ValueError(f"encode_sparse on a {self.cfg.activation} SAE needs an explicit k")
            vals, idx = torch.topk(F.relu(self.pre_activations(x)), self.cfg.k, dim=-1)
            return vals, idx
        return torch.topk(self.encode(x), k, dim=-1)

    def feature_activations(self, x: torch.Tensor, feature_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Activations ``z_j(x)`` of the chosen features, ``[..., len(feature_ids)]``.

        Equal to ``encode(x)[..., feature_ids]``; for TopK a feature counts as active when its
        (ReLU'd) pre-activation reaches the k-th largest value at that position.
        """
        ids = self._ids(feature_ids)
        pre = self.pre_activations(x)
        chosen = pre.index_select(-1, ids)
        act = self.cfg.activation
        if act == "topk":
            kth = torch.topk(pre, self.cfg.k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            return torch.where(chosen >= kth, F.relu(chosen), torch.zeros_like(chosen))
        if act == "jumprelu":
            return F.relu(chosen) * (chosen > self.threshold.index_select(0, ids))
        return F.relu(chosen)

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        flat_v = values.reshape(-1, values.shape[-1])
        flat_i = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec).reshape(*values.shape[:-1], self.d_in)

    def decoder_directions(self, feature_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Decoder rows ``W_dec[j]`` of the chosen features, ``[len(feature_ids), D]``."""
        return self.W_dec.index_select(0, self._ids(feature_ids))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def _ids(self, feature_ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(feature_ids, dtype=torch.long, device=self.W_dec.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_latents):
            bad = [int(i) for i in ids.tolist() if not 0 <= i < self.num_latents]
            raise IndexError(f"feature ids {bad} out of range [0, {self.num_latents})")
        return ids


def random_topk_sae(
    d_in: int, num_latents: int, k: int, *, seed: int = 0, dtype=torch.float32, device=None
) -> SparseAutoencoder:
    """A seeded random TopK SAE with unit-norm decoder rows and the encoder tied to the decoder
    (so features respond to their own directions, which makes steering tests meaningful)."""
    # Drawn on the target device (a 131072 x 4096 SAE is quick to make on a GPU, slow on a host),
    # so the same seed gives the same SAE on the same kind of device.
    device = torch.device(device or "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, num_latents=num_latents, activation="topk", k=k),
                            device=device, dtype=dtype)
    with torch.no_grad():
        w = torch.randn(num_latents, d_in, generator=gen, device=device)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w)
        sae.b_enc.copy_(0.01 * torch.randn(num_latents, generator=gen, device=device))
        sae.b_dec.zero_()
    return sae
