"""Where an SAE comes from: a local directory, a hub repo (through huggingface_hub's cache), or
``builtin:random-topk`` (seeded random weights, for tests and the offline default).

A hub source is ``org/name`` plus an optional hookpoint (the subfolder, e.g. ``model.layers.24``)
and revision; ``org/name/model.layers.24`` and ``org/name@rev`` are accepted as shorthands.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .layouts import SAEFormatError, detect_layout, load_directory
from .sae import SparseAutoencoder, random_topk_sae

BUILTIN_RANDOM_TOPK = "builtin:random-topk"


class SAESourceError(ValueError):
    """The SAE could not be found or fetched; the message names the source."""


@dataclass
class RandomTopKSpec:
    d_in: int | None = None
    num_latents: int | None = None
    k: int = 8
    seed: int = 0


def parse_builtin(source: str) -> RandomTopKSpec:
    """``builtin:random-topk[:d_in=64,latents=512,k=8,seed=0]``; d_in/latents default from the model."""
    head, _, opts = source.partition(":random-topk")
    if head != "builtin" or (opts and not opts.startswith(":")):
        raise SAESourceError(f"{source!r}: unknown builtin SAE (known: {BUILTIN_RANDOM_TOPK})")
    spec = RandomTopKSpec()
    names = {"d_in": "d_in", "latents": "num_latents", "k": "k", "seed": "seed"}
    for item in filter(None, opts[1:].split(",")):
        key, _, value = item.partition("=")
        if key not in names or not value.lstrip("-").isdigit():
            raise SAESourceError(f"{source!r}: bad option {item!r} (options: {', '.join(names)}=<int>)")
        setattr(spec, names[key], int(value))
    return spec


def is_builtin(source: str) -> bool:
    return str(source).startswith("builtin:")


def _looks_like_repo(source: str) -> bool:
    parts = source.split("@")[0].split("/")
    return len(parts) >= 2 and not source.startswith((".", "/", "~")) and all(parts[:2])


DEFAULT_HUB_TIMEOUT_S = 60.0


def resolve_directory(source: str | Path, hookpoint: str | None = None, revision: str | None = None,
                      timeout_s: float = DEFAULT_HUB_TIMEOUT_S) -> Path:
    """A local directory holding cfg.json + weights for ``source`` (downloaded if needed; a hub
    that has not finished within ``timeout_s`` seconds is given up on)."""
    path = Path(source).expanduser()
    if path.exists():
        return _pick_subfolder(path, hookpoint)
    source = str(source)
    if not _looks_like_repo(source):
        raise SAESourceError(f"{source}: no such directory, and not a hub repo id (org/name)")
    repo, _, rev = source.partition("@")
    parts = repo.split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    sub = hookpoint or sub
    revision = revision or rev or None
    root = _download(repo_id, sub, revision, timeout_s)
    return _pick_subfolder(root, sub)


def _with_timeout(fn, timeout_s: float):
    """``fn()``, or TimeoutError after ``timeout_s``. The hub client has no overall deadline (a
    server that accepts and never answers held it for minutes), so it runs on a daemon thread
    that is abandoned when time is up."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="lmm-steer-hub", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def _download(repo_id: str, sub: str | None, revision: str | None, timeout_s: float) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    # Exact root names: a bare "*.safetensors" would match every hookpoint's weights in the repo.
    patterns = [f"{sub}/*", "cfg.json", "sae.safetensors", "sae_weights.safetensors"] if sub else None
    try:
        return Path(_with_timeout(
            lambda: snapshot_download(repo_id, revision=revision, allow_patterns=patterns), timeout_s))
    except GatedRepoError:
        raise SAESourceError(f"{repo_id}: gated on the hub; accept its terms there and give a token "
                             "(HF_TOKEN, or `hf auth login`)") from None
    except RepositoryNotFoundError:
        # the hub answers 401 for a private repo and for a missing one alike when no token is sent
        raise SAESourceError(f"{repo_id}: not found on the hub, or private (a private repo needs a token: "
                             "HF_TOKEN, or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise SAESourceError(f"{repo_id}: revision {revision!r} not found on the hub") from None
    except Exception as e:  # noqa: BLE001 - offline, unreachable, timed out, or a transport error
        why = f"no answer within {timeout_s:g} s (--hub-timeout)" if isinstance(e, TimeoutError) else type(e).__name__
        try:  # fall back to the cache, else say exactly what happened
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise SAESourceError(
                f"{repo_id}: the hub is unreachable ({why}) and no cached copy"
                f"{f' of {sub!r}' if sub else ''} was found") from None


def _pick_subfolder(root: Path, hookpoint: str | None) -> Path:
    if not root.is_dir():
        raise SAESourceError(f"{root}: not a directory")
    if hookpoint:
        if ".." in Path(hookpoint).parts or Path(hookpoint).is_absolute():
            raise SAESourceError(f"hookpoint {hookpoint!r} must name a subfolder inside {root}, not climb out of it")
        sub = root / hookpoint
        if sub.is_dir():
            return sub
        if (root / "cfg.json").exists():
            return root
        raise SAESourceError(
            f"{root}: no subfolder {hookpoint!r} (has {sorted(p.name for p in root.iterdir() if p.is_dir())})"
        )
    if (root / "cfg.json").exists():
        return root
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and (p / "cfg.json").exists())
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise SAESourceError(
            f"{root}: holds several SAEs {[p.name for p in candidates]}; choose one with --hookpoint"
        )
    detect_layout(root)  # raises the precise "unknown layout" / pickle error
    return root


def load_sae(
    source: str | Path,
    *,
    hookpoint: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    d_in: int | None = None,
    timeout_s: float = DEFAULT_HUB_TIMEOUT_S,
) -> SparseAutoencoder:
    """Load an SAE from any source. ``d_in`` (the model's hidden size) is checked when given and
    sizes ``builtin:random-topk``."""
    if is_builtin(str(source)):
        spec = parse_builtin(str(source))
        width = spec.d_in or d_in
        if width is None:
            raise SAESourceError(f"{source}: needs d_in (give d_in=<int> or load it with a model)")
        sae = random_topk_sae(
            width, spec.num_latents or 8 * width, spec.k, seed=spec.seed, dtype=dtype or torch.float32,
            device=device,
        )
        sae.cfg.hookpoint = hookpoint
    else:
        sae = load_directory(resolve_directory(source, hookpoint, revision, timeout_s), device=device, dtype=dtype)
        if hookpoint and not sae.cfg.hookpoint:
            sae.cfg.hookpoint = hookpoint
    sae.requires_grad_(False)  # served SAEs are read-only; training builds its own
    if d_in is not None and sae.d_in != d_in:
        raise SAEFormatError(
            f"{source}: SAE d_in={sae.d_in} (decoder rows of size {sae.W_dec.shape[1]}) does not match "
            f"the model's hidden size {d_in}"
        )
    return sae
