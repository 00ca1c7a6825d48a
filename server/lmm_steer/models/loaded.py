"""What a model loader hands to the engine: the model and the pieces that turn messages into inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedModel:
    name: str
    family: str  # "llava-next", "llava", "llava-onevision", "qwen2-vl", "idefics3", "llama"
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    processor: Any | None  # None for text-only models

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None
