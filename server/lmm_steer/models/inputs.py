"""Chat messages (+ images) -> model inputs, the same way for every family."""

from __future__ import annotations

from .loaded import LoadedModel


def prompt_text(loaded: LoadedModel, messages: list[dict]) -> str:
    """The chat-templated prompt, ending with the assistant's turn header."""
    renderer = loaded.processor if loaded.is_multimodal else loaded.tokenizer
    if not loaded.is_multimodal:
        messages = [_text_only(m) for m in messages]
    return renderer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _text_only(message: dict) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        parts = [c for c in content if c.get("type") != "text"]
        if parts:
            raise ValueError(f"model is text-only; message has {parts[0].get('type')!r} content")
        content = "".join(c["text"] for c in content)
    return {**message, "content": content}


def build_inputs(loaded: LoadedModel, messages: list[dict], images: list | None = None) -> dict:
    """Tokenised inputs (input_ids [1, T], attention_mask, and pixel tensors when images are given)."""
    text = prompt_text(loaded, messages)
    if not loaded.is_multimodal:
        return dict(loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False))
    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = [list(images)] if loaded.family == "idefics3" else list(images)
    if loaded.family != "qwen2-vl":
        kwargs["add_special_tokens"] = False
    return dict(loaded.processor(**kwargs))
