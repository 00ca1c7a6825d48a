"""On-disk SAE layouts: EleutherAI sparsify (the paper's release) and SAELens v6.

sparsify:  <dir>/cfg.json + <dir>/sae.safetensors
           encoder.weight [M,D], encoder.bias [M], W_dec [M,D], b_dec [D]
saelens:   <dir>/cfg.json + <dir>/sae_weights.safetensors
           W_enc [D,M], b_enc [M], W_dec [M,D], b_dec [D], threshold [M] (jumprelu)

Reading is lazy and per tensor (safetensors memory-maps the file), so a 131072 x 4096 SAE is
converted to the target dtype/device one tensor at a time and never held twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .sae import SAEConfig, SparseAutoencoder

SPARSIFY, SAELENS = "sparsify", "saelens"
LAYOUT_FILES = {SPARSIFY: "sae.safetensors", SAELENS: "sae_weights.safetensors"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_SAELENS_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
# what `sae convert --to saelens` writes: the config format SAELens has read since 6.0
SAELENS_FORMAT_VERSION = "6.0.0"


def _version(text: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text))
    except InvalidVersion:
        return None


_SAELENS_6 = _version("6.0.0rc0")


def _metadata(raw: dict) -> dict:
    return raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}


def saelens_version(raw: dict):
    """The SAELens version a cfg.json was written by (top level or ``metadata``), if it says."""
    text = raw.get("sae_lens_version") or _metadata(raw).get("sae_lens_version")
    return _version(text) if text else None


class SAEFormatError(ValueError):
    """A checkpoint that cannot be read as an SAE; the message names the file and the problem."""


def detect_layout(directory: Path) -> str:
    """Which layout ``directory`` holds, from the files present (not from names in cfg.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SAEFormatError(f"{directory}: not a directory")
    found = {p.name for p in directory.iterdir()}
    for layout, weights in LAYOUT_FILES.items():
        if weights in found:
            if "cfg.json" not in found:
                raise SAEFormatError(f"{directory / 'cfg.json'}: missing (found {weights} without its config)")
            return layout
    pickles = sorted(n for n in found if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SAEFormatError(
            f"{directory / pickles[0]}: pickle checkpoints are never loaded (they can run arbitrary code); "
            "convert it to safetensors with the tool that wrote it"
        )
    if "cfg.json" in found:
        raise SAEFormatError(
            f"{directory}: has cfg.json but neither {LAYOUT_FILES[SPARSIFY]} (sparsify) "
            f"nor {LAYOUT_FILES[SAELENS]} (SAELens)"
        )
    raise SAEFormatError(
        f"{directory}: unknown SAE layout: expected cfg.json with sae.safetensors (sparsify) or "
        f"sae_weights.safetensors (SAELens); found {sorted(found) or 'nothing'}"
    )


def _read_cfg(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _int_field(cfg: dict, key: str, path: Path, *, required: bool = True) -> int | None:
    value = cfg.get(key)
    if value is None:
        if required:
            raise SAEFormatError(f"{path}: missing required key {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFormatError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def read_config(directory: Path, layout: str | None = None) -> tuple[str, SAEConfig, dict]:
    """The layout, the normalised config, and the raw cfg.json of the SAE in ``directory``."""
    directory = Path(directory)
    layout = layout or detect_layout(directory)
    path = directory / "cfg.json"
    raw = _read_cfg(path)
    if layout == SPARSIFY:
        d_in = _int_field(raw, "d_in", path)
        k = _int_field(raw, "k", path)
        # sparsify writes num_latents 0 when expansion_factor decides
        m = _int_field(raw, "num_latents", path, required=False) if raw.get("num_latents") else None
        if not m:
            ef = _int_field(raw, "expansion_factor", path, required=False)
            if ef is None:
                raise SAEFormatError(f"{path}: needs 'num_latents' or 'expansion_factor'")
            m = d_in * ef
        activation = raw.get("activation", "topk")
        if activation != "topk":
            raise SAEFormatError(f"{path}: activation {activation!r} is not supported (only 'topk')")
        if raw.get("signed"):
            raise SAEFormatError(f"{path}: signed activations are not supported")
        if raw.get("skip_connection") or raw.get("transcode"):
            raise SAEFormatError(f"{path}: skip connections / transcoders are not supported")
        try:
            cfg = SAEConfig(d_in=d_in, num_latents=m, activation="topk", k=k, hookpoint=directory.name)
        except ValueError as e:
            raise SAEFormatError(f"{path}: {e}") from None
    else:
        d_in = _int_field(raw, "d_in", path)
        m = _int_field(raw, "d_sae", path)
        version = saelens_version(raw)
        if "architecture" not in raw and version is not None and version >= _SAELENS_6:
            # SAELens reads a config without a version as pre-6.0 (architecture "standard"); from
            # 6.0 on the architecture is required, and SAELens refuses a config without one.
            raise SAEFormatError(f"{path}: a SAELens {version} config without 'architecture' (SAELens refuses "
                                 "it too); add \"architecture\": \"topk\", \"jumprelu\" or \"standard\"")
        arch = raw.get("architecture", "standard")
        if arch not in _SAELENS_ARCH:
            raise SAEFormatError(
                f"{path}: architecture {arch!r} is not supported (supported: {sorted(_SAELENS_ARCH)})"
            )
        norm = raw.get("normalize_activations") or "none"
        if norm != "none":
            raise SAEFormatError(f"{path}: normalize_activations {norm!r} is not supported (only 'none')")
        if raw.get("rescale_acts_by_decoder_norm") and arch == "jumprelu":
            raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm with a JumpReLU SAE is not supported")
        k = _int_field(raw, "k", path) if arch == "topk" else None
        hook = _metadata(raw).get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
        try:
            cfg = SAEConfig(
                d_in=d_in,
                num_latents=m,
                activation=_SAELENS_ARCH[arch],
                k=k,
                apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                hookpoint=hook,
            )
        except ValueError as e:
            raise SAEFormatError(f"{path}: {e}") from None
    if cfg.activation == "topk" and cfg.k > cfg.num_latents:
        raise SAEFormatError(f"{path}: k={cfg.k} exceeds the number of latents {cfg.num_latents}")
    return layout, cfg, raw


def _expected_shapes(layout: str, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    m, d = cfg.num_latents, cfg.d_in
    if layout == SPARSIFY:
        return {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    shapes = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
    if cfg.activation == "jumprelu":
        shapes["threshold"] = (m,)
    return shapes


def _check_finite(name: str, t: torch.Tensor, path: Path) -> None:
    # Chunked over rows so a 2 GB tensor does not allocate a 0.5 GB boolean mask.
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    for chunk in rows.split(8192):
        if not torch.isfinite(chunk).all():
            raise SAEFormatError(f"{path}: tensor {name!r} contains NaN or infinite values")


class _CheckedFile:
    """The weights file of the SAE in ``directory``, opened and checked against its cfg.json: the
    tensor names (none missing, none extra) and shapes, from the safetensors header alone."""

    def __init__(self, directory: Path) -> None:
        self.layout, self.cfg, self.raw = read_config(directory)
        self.path = Path(directory) / LAYOUT_FILES[self.layout]
        self.expected = _expected_shapes(self.layout, self.cfg)
        try:
            self.handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            raise SAEFormatError(f"{self.path}: not a readable safetensors file ({e})") from None

    def __enter__(self):
        f = self.file = self.handle.__enter__()
        names = set(f.keys())
        missing = sorted(set(self.expected) - names)
        if missing:
            raise SAEFormatError(f"{self.path}: missing tensors {missing} (has {sorted(names)})")
        extra = sorted(names - set(self.expected))
        if extra:
            raise SAEFormatError(f"{self.path}: unexpected tensors {extra}; this SAE variant is not supported")
        for name, shape in self.expected.items():
            got = tuple(f.get_slice(name).get_shape())
            if got != shape:
                raise SAEFormatError(
                    f"{self.path}: tensor {name!r} has shape {list(got)}, but cfg.json "
                    f"(d_in={self.cfg.d_in}, latents={self.cfg.num_latents}) implies {list(shape)}"
                )
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def dtype_name(self, name: str) -> str:
        return self.file.get_slice(name).get_dtype()

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, checked finite; a truncated data section is reported as such."""
        try:
            t = self.file.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for a short file
            raise SAEFormatError(f"{self.path}: tensor {name!r} could not be read ({e})") from None
        _check_finite(name, t, self.path)
        return t

    @property
    def rescale_by_decoder_norm(self) -> bool:
        return self.layout == SAELENS and bool(self.raw.get("rescale_acts_by_decoder_norm"))


def check_directory(directory: Path) -> tuple[str, SAEConfig, str]:
    """Everything ``load_directory`` checks, without building the SAE: the layout, the config and
    the stored dtype name; raises SAEFormatError with the file and the problem."""
    with _CheckedFile(directory) as f:
        for name in f.expected:
            t = f.tensor(name)  # read, checked and dropped one at a time: a 2 GB SAE is never held whole
            if name == "W_dec" and f.rescale_by_decoder_norm:
                _decoder_norms(t, f.path)
            del t
        return f.layout, f.cfg, _dtype_name(_safetensors_dtype(f.dtype_name("W_dec")))


def _decoder_norms(w_dec: torch.Tensor, path: Path) -> torch.Tensor:
    norms = w_dec.float().norm(dim=-1)
    if not bool((norms > 0).all()):
        raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm with an all-zero decoder row "
                             f"(latent {int((norms == 0).nonzero()[0])})")
    return norms


def load_directory(
    directory: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SparseAutoencoder:
    """Load the SAE in ``directory`` (either layout) into ``dtype`` on ``device``."""
    with _CheckedFile(Path(directory)) as f:
        cfg, expected = f.cfg, f.expected
        target_dtype = dtype or _safetensors_dtype(f.dtype_name(next(iter(expected))))
        # Allocate once, directly in the target dtype and device; tensors are copied in one by one.
        with torch.device("meta"):
            sae = SparseAutoencoder(cfg, dtype=target_dtype)
        sae = sae.to_empty(device=device)
        sae.source_cfg = dict(f.raw)
        ours = {
            "encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_enc": "W_enc", "b_enc": "b_enc",
            "W_dec": "W_dec", "b_dec": "b_dec", "threshold": "threshold",
        }
        norms = None
        # folding needs the decoder norms before the encoder: W_dec is then read first (once)
        order = sorted(expected, key=lambda n: n != "W_dec") if f.rescale_by_decoder_norm else list(expected)
        for name in order:
            t = f.tensor(name)
            if name == "W_dec" and f.rescale_by_decoder_norm:
                norms = _decoder_norms(t, f.path)
            if name == "W_enc":  # SAELens stores [D, M]; we keep sparsify's [M, D]
                t = t.t()
            if norms is not None:
                t = _fold_decoder_norm(name, t, norms)
            param = getattr(sae, ours[name])
            with torch.no_grad():
                param.copy_(t)
            del t
    return sae


def _fold_decoder_norm(name: str, t: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """SAELens's ``rescale_acts_by_decoder_norm``: pre-activations are multiplied by each latent's
    decoder norm before the activation, and activations divided by it before decoding. Scaling
    the encoder rows and bias by the norm and dividing the decoder rows by it computes exactly
    that (for TopK and ReLU, which commute with a positive per-latent scale), so the served SAE
    needs no special case; its activations are SAELens's."""
    if name in ("W_enc", "b_enc"):
        return (t.float() * (norms[:, None] if t.dim() == 2 else norms)).to(t.dtype)
    if name == "W_dec":
        return (t.float() / norms[:, None]).to(t.dtype)
    return t


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return table.get(name, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sparsify_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    if sae.cfg.activation != "topk":
        raise SAEFormatError(
            f"the sparsify layout only holds TopK SAEs; this one is {sae.cfg.activation} (use --to saelens)"
        )
    w_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    if not sae.cfg.apply_b_dec_to_input:
        # sparsify always encodes x - b_dec; fold b_dec into the encoder bias so results match:
        # W (x - b) + (c + W b) = W x + c
        b_enc = b_enc + w_enc @ sae.b_dec.detach()
    return {
        "encoder.weight": w_enc.contiguous(),
        "encoder.bias": b_enc.contiguous(),
        "W_dec": sae.W_dec.detach().contiguous(),
        "b_dec": sae.b_dec.detach().contiguous(),
    }


def _saelens_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    out = {
        "W_enc": sae.W_enc.detach().t().contiguous(),
        "b_enc": sae.b_enc.detach().contiguous(),
        "W_dec": sae.W_dec.detach().contiguous(),
        "b_dec": sae.b_dec.detach().contiguous(),
    }
    if sae.threshold is not None:
        out["threshold"] = sae.threshold.detach().contiguous()
    return out


# What SAELens keeps beside the weights' own shape: a SAELens 6 config holds these under
# ``metadata``, an earlier one at the top level. ``sae convert --to saelens`` carries over every one
# the source gives (and any other metadata key), so the converted SAE still says what it was trained on.
SAELENS_METADATA_KEYS = (
    "model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name", "model_from_pretrained_kwargs",
    "context_size", "dataset_path", "dataset_trust_remote_code", "prepend_bos", "seqpos_slice", "exclude_special_tokens",
    "sae_lens_training_version", "neuronpedia_id",
)
# Fields the SAELens config gets from the weights as written here, never from the source.
_SAELENS_WRITTEN = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                    "reshape_activations", "k", "metadata", "sae_lens_version",
                    # folded into the weights on load: the written SAE is plain
                    "rescale_acts_by_decoder_norm"}


def _source_fields(source: dict | None) -> tuple[dict, dict]:
    """A source cfg.json's fields worth keeping in a SAELens config: (top level, metadata)."""
    if not source:
        return {}, {}
    metadata = {k: v for k, v in source.items() if k in SAELENS_METADATA_KEYS}
    metadata.update(_metadata(source))
    metadata.pop("sae_lens_version", None)
    top = {k: v for k, v in source.items() if k not in _SAELENS_WRITTEN and k not in SAELENS_METADATA_KEYS}
    if "architecture" not in source and "d_sae" not in source:  # a sparsify config: its fields describe sparsify
        top = {}
    return top, metadata


def _cfg_json(sae: SparseAutoencoder, layout: str, hookpoint: str | None) -> dict:
    c = sae.cfg
    if layout == SPARSIFY:
        return {
            "activation": "topk", "k": c.k, "num_latents": c.num_latents, "d_in": c.d_in,
            "expansion_factor": max(1, c.num_latents // c.d_in), "normalize_decoder": True,
            "multi_topk": False, "signed": False,
        }
    arch = {v: k for k, v in _SAELENS_ARCH.items()}[c.activation]
    top, metadata = _source_fields(getattr(sae, "source_cfg", None))
    cfg = {
        **top,
        "architecture": arch, "d_in": c.d_in, "d_sae": c.num_latents,
        "dtype": _dtype_name(sae.W_dec.dtype), "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**metadata, "hook_name": hookpoint, "sae_lens_version": SAELENS_FORMAT_VERSION},
    }
    if c.activation == "topk":
        cfg["k"] = c.k
    return cfg


def check_hookpoint_name(hookpoint: str | None, dst: Path, layout: str) -> None:
    """A hookpoint ``save_sae`` can write under ``dst``: one plain name (e.g. ``model.layers.24``), not a
    path. In the sparsify layout it names the subfolder written inside ``dst``; in SAELens's, the hook
    the SAE reads (``metadata.hook_name`` of ``dst/cfg.json``)."""
    if hookpoint is None:
        return
    if hookpoint in ("", ".", "..") or "/" in hookpoint or "\\" in hookpoint or "\0" in hookpoint:
        what = (f"names the subfolder written inside {dst}" if layout == SPARSIFY
                else f"is written to {Path(dst) / 'cfg.json'} as the hook name")
        raise SAEFormatError(f"hookpoint {hookpoint!r} {what}, so it must be one plain name (e.g. "
                             "model.layers.24), not a path")


def save_sae(sae: SparseAutoencoder, dst: Path, layout: str, *, hookpoint: str | None = None) -> Path:
    """Write ``sae`` under ``dst`` in ``layout``; returns the directory holding cfg.json.

    sparsify goes to ``dst/<hookpoint>/`` (as the paper's release), SAELens to ``dst/``.
    The write is atomic: everything goes to a temporary sibling that is renamed into place,
    so a failure leaves nothing at ``dst``.
    """
    dst = Path(dst)
    if layout not in LAYOUT_FILES:
        raise SAEFormatError(f"unknown layout {layout!r} (use {SPARSIFY!r} or {SAELENS!r})")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise SAEFormatError(f"{dst}: already exists and is not empty; refusing to overwrite")
    hookpoint = hookpoint or sae.cfg.hookpoint
    if layout == SPARSIFY and not hookpoint:
        raise SAEFormatError("the sparsify layout needs a hookpoint name for its subfolder (--hookpoint)")
    check_hookpoint_name(hookpoint, dst, layout)
    tensors = _sparsify_tensors(sae) if layout == SPARSIFY else _saelens_tensors(sae)
    cfg = _cfg_json(sae, layout, hookpoint)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        inner = tmp / hookpoint if layout == SPARSIFY else tmp
        inner.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(inner / LAYOUT_FILES[layout]))
        (inner / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst / hookpoint if layout == SPARSIFY else dst


def tensor_bytes(directory: Path, layout: str) -> int:
    return (Path(directory) / LAYOUT_FILES[layout]).stat().st_size
