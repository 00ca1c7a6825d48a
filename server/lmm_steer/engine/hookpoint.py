"""Where the SAE sits: the output of decoder block i of the language model, ``model.layers.<i>``.

Every supported family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL, Idefics3 /
SmolVLM, Llama-family text models) exposes its language model through ``get_decoder()``, whose
``layers`` are Llama-shaped blocks; the sparsify name counts blocks of that language model
whatever the wrapper's own attribute path is (``model.language_model.layers.24`` in LLaVA-NeXT).
"""

from __future__ import annotations

import re

_SPARSIFY_NAME = re.compile(r"^(?:model\.)?(?:language_model\.|text_model\.)?(?:model\.)?layers\.(\d+)$")


class HookpointError(ValueError):
    pass


def language_model(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        raise HookpointError(f"{type(model).__name__}: cannot find its language model's decoder layers")
    return decoder


def resolve_layer_index(model, hookpoint: str) -> int:
    """Block index for ``hookpoint`` (``model.layers.24``, ``layers.24``, ``model.language_model.layers.24``
    or a bare ``24``)."""
    decoder = language_model(model)
    n = len(decoder.layers)
    hp = hookpoint.strip()
    m = _SPARSIFY_NAME.match(hp)
    if hp.isdigit():
        index = int(hp)
    elif m:
        index = int(m.group(1))
    else:
        raise HookpointError(
            f"hookpoint {hookpoint!r} is not a decoder block output; use 'model.layers.<i>' with i in 0..{n - 1}"
        )
    if not 0 <= index < n:
        raise HookpointError(f"hookpoint {hookpoint!r}: the language model has blocks 0..{n - 1}")
    return index


def default_hookpoint(model) -> str:
    """The paper's choice scaled to depth: block 24 of 32, i.e. three quarters down."""
    n = len(language_model(model).layers)
    return f"model.layers.{(3 * n) // 4}"


def block_hidden(output):
    """A decoder block's hidden states from what its forward returned (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output, hidden):
    """``output`` with its hidden states replaced by ``hidden``, in the same form (for forward hooks)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _Captured(Exception):
    """Raised by the capturing hook to stop the forward pass: no block after the hookpoint is needed."""


def capture_block_output(model, index: int, inputs: dict):
    """Block ``index``'s hidden states ``[B, T, D]`` for ``inputs`` (already on the model's device);
    the blocks after it and the output head never run."""
    captured = {}

    def hook(module, args, output):
        captured["h"] = block_hidden(output)
        raise _Captured

    handle = language_model(model).layers[index].register_forward_hook(hook)
    try:
        model(**inputs, logits_to_keep=1)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["h"]
