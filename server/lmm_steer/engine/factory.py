"""Build an engine from names: model source, SAE source, hookpoint, dtype, device."""

from __future__ import annotations

import torch

from sae_weights import load_sae
from sae_weights.source import DEFAULT_HUB_TIMEOUT_S

from ..models.loader import load_model
from .engine import Engine, EngineConfig
from .hookpoint import default_hookpoint, language_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_device_arguments(parser) -> None:
    """``--dtype`` and ``--device``, the same for every command that loads a model."""
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when available)")


def add_decode_arguments(parser) -> None:
    """``--no-cuda-graphs`` and ``--compile``, the same for every command that decodes."""
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA too")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder block's decode work and the steering edit (fewer, "
                             "fused kernels; each new batch shape compiles first). bench: measure compiled "
                             "engines beside the others")


def add_hub_timeout_argument(parser) -> None:
    """``--hub-timeout``, for every command that may fetch an SAE from the hub."""
    parser.add_argument("--hub-timeout", type=float, default=DEFAULT_HUB_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up on a hub that has not answered within this long (default {DEFAULT_HUB_TIMEOUT_S:g})")


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}") from None


def build_engine(
    model: str, sae: str | None = None, *, hookpoint: str | None = None, revision: str | None = None,
    dtype: str | None = None, device: str | None = None, config: EngineConfig | None = None,
    hub_timeout: float = DEFAULT_HUB_TIMEOUT_S,
) -> Engine:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    loaded = load_model(model, dtype=dt, device=dev)
    return engine_for(loaded, sae, hookpoint=hookpoint, revision=revision, device=dev, dtype=dt, config=config,
                      hub_timeout=hub_timeout)


def engine_for(
    loaded, sae: str | None = None, *, hookpoint: str | None = None, revision: str | None = None,
    device: torch.device | None = None, dtype: torch.dtype | None = None, config: EngineConfig | None = None,
    hub_timeout: float = DEFAULT_HUB_TIMEOUT_S,
) -> Engine:
    """An engine around a model already loaded; the SAE goes to ``device`` and ``dtype`` (default:
    the model's)."""
    sae_module = None
    if sae and sae.lower() != "none":
        param = next(loaded.model.parameters())
        hidden = language_model(loaded.model).config.hidden_size
        sae_module = load_sae(sae, hookpoint=hookpoint, revision=revision, device=device or param.device,
                              dtype=dtype or param.dtype, d_in=hidden, timeout_s=hub_timeout)
        hookpoint = hookpoint or sae_module.cfg.hookpoint or default_hookpoint(loaded.model)
    return Engine(loaded, sae_module, hookpoint if sae_module is not None else None, config)
