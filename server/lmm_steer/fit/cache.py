"""The fit split's pass (the model's answers and pooled SAE codes) kept in a safetensors file, so
that trying another grid on the same data skips it. The file says what it was computed from; a
file from anything else is recomputed, never read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_key(model: str, weights: str | None, sae: str | None, hookpoint: str | None, items: list[dict]) -> str:
    """What the pass depends on: the model, its SAE and hook, every question asked, and the pools."""
    from .codes import POOLS

    asked = [[q["image"], q["question"]] for q in items]
    digest = hashlib.sha256(json.dumps(asked).encode()).hexdigest()
    return json.dumps({"model": model, "weights": weights, "sae": sae, "hookpoint": hookpoint, "questions": digest,
                       "pools": list(POOLS)})


def load_pass(path: Path, key: str) -> tuple[list[str], dict[str, torch.Tensor]] | None:
    """The answers and codes stored at ``path`` for ``key``; None when absent or computed from other inputs."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        return None
    return json.loads(meta["answers"]), load_file(str(path))


def save_pass(path: Path, key: str, answers: list[str], codes: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in codes.items()}, str(path),
              metadata={"key": key, "answers": json.dumps(answers)})
