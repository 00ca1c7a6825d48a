"""Qwen2-VL / Qwen2.5-VL inputs without the transformers processor.

transformers 5.x builds Qwen2VLProcessor with a video processor that needs torchvision, so on a
machine without it the processor cannot be constructed at all. The image half needs nothing of
the kind: the real image processor (PIL backend) gives ``pixel_values`` and ``image_grid_thw``,
and each ``<|image_pad|>`` placeholder becomes ``t*h*w / merge_size**2`` copies, as the real
processor does.
"""

from __future__ import annotations

from transformers import BatchFeature


class Qwen2VLImageInputs:
    image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kw):
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
            tokenize=tokenize, **kw,
        )

    def __call__(self, text, images=None, return_tensors: str = "pt", **kw) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict = {}
        if images:
            flat = [im for group in images for im in (group if isinstance(group, list | tuple) else [group])]
            data.update(self.image_processor(images=flat, return_tensors=return_tensors))
            counts = (data["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            placeholder = "\0"  # keeps already-expanded tokens from being expanded again
            it = iter(counts)
            expanded = []
            for t in texts:
                while self.image_token in t:
                    try:
                        n = next(it)
                    except StopIteration:
                        raise ValueError("more image placeholders in the text than images") from None
                    t = t.replace(self.image_token, placeholder * n, 1)
                expanded.append(t.replace(placeholder, self.image_token))
            if next(it, None) is not None:
                raise ValueError("more images than image placeholders in the text")
            texts = expanded
        data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=len(texts) > 1))
        # Newer transformers wants the token types (0 text, 1 image) to compute M-RoPE positions.
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        data["mm_token_type_ids"] = (data["input_ids"] == image_id).long()
        return BatchFeature(data=data, tensor_type=return_tensors)
