"""Load a model by name: ``builtin:<tiny-model>`` or a hub id / local path through transformers."""

from __future__ import annotations

import torch

from . import scenes_llava_next
from .builtin import BUILTIN_MODELS, build_builtin
from .loaded import LoadedModel
from .smollm2 import NAME as SMOLLM2
from .smollm2 import SmolLM2Missing, load_smollm2

# model_type in config.json -> our family name (which decides hook resolution and input handling)
FAMILIES = {
    "llava_next": "llava-next",
    "llava": "llava",
    "llava_onevision": "llava-onevision",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2-vl",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


class ModelLoadError(ValueError):
    pass


def load_model(
    name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    revision: str | None = None,
) -> LoadedModel:
    if name == SMOLLM2:
        try:
            return load_smollm2(device=device, dtype=dtype or torch.float32)
        except SmolLM2Missing as e:
            raise ModelLoadError(str(e)) from None
    if name == scenes_llava_next.NAME:
        try:
            return scenes_llava_next.load_scenes_llava_next(device=device, dtype=dtype or torch.float32)
        except (SmolLM2Missing, scenes_llava_next.ScenesWeightsMissing) as e:
            raise ModelLoadError(str(e)) from None
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            known = sorted([*BUILTIN_MODELS, SMOLLM2, scenes_llava_next.NAME])
            raise ModelLoadError(f"unknown builtin model {name!r} (known: {known})")
        return build_builtin(name, device=device, dtype=dtype or torch.float32)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as e:
        raise ModelLoadError(f"{name}: cannot load its config ({e})") from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(
            f"{name}: model_type {config.model_type!r} is not supported (supported: {sorted(FAMILIES)})"
        )
    auto = AutoModelForCausalLM if family == "llama" else AutoModelForImageTextToText
    model = auto.from_pretrained(name, revision=revision, dtype=dtype or "auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    processor = None if family == "llama" else _processor(name, revision, family, tokenizer)
    return LoadedModel(name, family, model, tokenizer, processor)


def _processor(name: str, revision: str | None, family: str, tokenizer):
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, revision=revision)
    except (ImportError, AttributeError, ValueError):
        if family != "qwen2-vl":
            raise
        # Without torchvision the Qwen2-VL processor cannot be built (its video half needs it).
        from .qwen2_vl_inputs import Qwen2VLImageInputs

        return Qwen2VLImageInputs(AutoImageProcessor.from_pretrained(name, revision=revision), tokenizer)
