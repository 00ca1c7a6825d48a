"""Residual-stream activations at a hookpoint, from the same loader and prompt path as the server,
optionally cached on disk in safetensors shards for reuse across runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..engine.hookpoint import block_hidden, capture_block_output, language_model, with_block_hidden
from ..engine.prefill import image_token_id
from ..models.inputs import build_inputs
from .data import Example

SHARD_TOKENS = 1 << 18


def _load_images(ex: Example):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in ex.images]


def encoded(loaded, examples: Iterable[Example], max_len: int) -> Iterator[dict]:
    """Model inputs per example (truncated to ``max_len`` tokens when text-only)."""
    for ex in examples:
        images = _load_images(ex) if ex.images else None
        if images and not loaded.is_multimodal:
            continue
        inputs = build_inputs(loaded, ex.messages, images)
        if not images and inputs["input_ids"].shape[1] > max_len:
            inputs = {k: v[:, :max_len] for k, v in inputs.items()}
        yield inputs


def _batches(loaded, examples, max_len: int, batch: int) -> Iterator[dict]:
    """Text-only inputs padded into batches (much faster on a CPU); image inputs one at a time."""
    pending: list[dict] = []

    def flush():
        width = max(x["input_ids"].shape[1] for x in pending)
        ids = torch.zeros(len(pending), width, dtype=torch.long)
        mask = torch.zeros(len(pending), width, dtype=torch.long)
        for i, x in enumerate(pending):
            n = x["input_ids"].shape[1]
            ids[i, :n] = x["input_ids"][0]
            mask[i, :n] = 1
        pending.clear()
        return {"input_ids": ids, "attention_mask": mask}

    for inputs in encoded(loaded, examples, max_len):
        if set(inputs) - {"input_ids", "attention_mask"}:
            yield inputs
            continue
        pending.append(inputs)
        if len(pending) == batch:
            yield flush()
    if pending:
        yield flush()


@torch.inference_mode()
def hidden_states(loaded, hook_index: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``hook_index``'s output ``[B, T, D]`` and the attention mask ``[B, T]``; the blocks
    after the hookpoint (and the output head) are never run."""
    model = loaded.model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    h = capture_block_output(model, hook_index, inputs)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    return h, mask.bool()


def collect(loaded, hook_index: int, examples: Iterable[Example], max_tokens: int, *, max_len: int = 256,
            batch: int = 16, skip_first: bool = True, dtype=torch.float16, cache_dir: Path | None = None,
            cache_key: dict | None = None) -> torch.Tensor:
    """Up to ``max_tokens`` activations ``[N, D]``, every position of every example (the first,
    attention-sink position of each sequence skipped by default: its norm dwarfs the rest)."""
    if cache_dir is not None:
        cached = _read_cache(Path(cache_dir), cache_key or {}, max_tokens)
        if cached is not None:
            return cached
    chunks, total = [], 0
    for inputs in _batches(loaded, examples, max_len, batch):
        h, mask = hidden_states(loaded, hook_index, inputs)
        if skip_first:
            mask = mask.clone()
            mask[:, 0] = False
        acts = h[mask].to("cpu", dtype)
        chunks.append(acts)
        total += acts.shape[0]
        if total >= max_tokens:
            break
    out = torch.cat(chunks)[:max_tokens] if chunks else torch.empty(0)
    if cache_dir is not None:
        _write_cache(Path(cache_dir), cache_key or {}, out)
    return out


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(root: Path, key: dict, max_tokens: int) -> torch.Tensor | None:
    manifest = root / "manifest.json"
    if not manifest.exists():
        return None
    meta = json.loads(manifest.read_text())
    if meta.get("key") != _key_hash(key) or meta.get("tokens", 0) < max_tokens:
        return None
    shards = [load_file(str(root / name))["acts"] for name in meta["shards"]]
    return torch.cat(shards)[:max_tokens]


def _write_cache(root: Path, key: dict, acts: torch.Tensor) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, start in enumerate(range(0, acts.shape[0], SHARD_TOKENS)):
        name = f"acts-{i:05d}.safetensors"
        save_file({"acts": acts[start : start + SHARD_TOKENS].contiguous()}, str(root / name))
        names.append(name)
    (root / "manifest.json").write_text(json.dumps({"key": _key_hash(key), "spec": key, "tokens": acts.shape[0],
                                                    "d_in": acts.shape[1] if acts.dim() == 2 else 0,
                                                    "shards": names}, indent=2))


@torch.inference_mode()
def splice_eval(loaded, hook_index: int, sae, examples: list[Example], max_len: int = 128) -> dict:
    """Next-token loss with the block output replaced by the SAE reconstruction, against the clean
    model, and the KL divergence between the two, on held-out examples; text targets only."""
    model = loaded.model
    layer = language_model(model).layers[hook_index]
    device = next(model.parameters()).device
    ce_clean = ce_spliced = kl = 0.0
    n = 0
    placeholder = image_token_id(model)

    def splice(module, args, output):
        # every position but the first, attention-sink one, which training leaves out too
        h = block_hidden(output)
        recon = torch.cat([h[:, :1], sae(h[:, 1:].to(sae.W_dec.dtype)).to(h.dtype)], dim=1)
        return with_block_hidden(output, recon)

    for inputs in _batches(loaded, examples, max_len, 8):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        valid = mask[:, 1:]
        clean = model(**inputs).logits[:, :-1].float()
        handle = layer.register_forward_hook(splice)
        try:
            spliced = model(**inputs).logits[:, :-1].float()
        finally:
            handle.remove()
        target = ids[:, 1:]
        if placeholder is not None:
            # image placeholders are not text to predict: hundreds of them per scene would swamp
            # the loss (a scene conversation scored 8.5 nats clean with them)
            valid = valid & (target != placeholder)
        lp_clean = F.log_softmax(clean, -1)
        lp_spliced = F.log_softmax(spliced, -1)
        ce_clean += float(-lp_clean.gather(-1, target[..., None])[..., 0][valid].sum())
        ce_spliced += float(-lp_spliced.gather(-1, target[..., None])[..., 0][valid].sum())
        kl += float((lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1)[valid].sum())
        n += int(valid.sum())
    n = max(n, 1)
    return {"ce_clean": ce_clean / n, "ce_spliced": ce_spliced / n, "ce_delta": (ce_spliced - ce_clean) / n,
            "kl": kl / n}
