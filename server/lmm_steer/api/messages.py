"""OpenAI chat messages -> the chat template's messages and the images they carry."""

from __future__ import annotations

from ..service import SteeringService
from .errors import APIError
from .images import ImageLimits, load_image
from .schemas import Message


async def template_messages(messages: list[Message], service: SteeringService, limits: ImageLimits):
    """OpenAI messages -> chat-template messages with ``{"type": "image"}`` parts, and the images."""
    out, images = [], []
    multimodal = service.engine.loaded.is_multimodal
    for i, m in enumerate(messages):
        if m.content is None or isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content or ""})
            continue
        parts = []
        for j, part in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if not multimodal:
                raise APIError(400, f"model {service.model_name} is text-only and cannot take images", param=param,
                               code="images_not_supported")
            if len(images) >= limits.max_images:
                raise APIError(400, f"too many images: at most {limits.max_images} per request", param="messages",
                               code="too_many_images")
            images.append(await load_image(part.image_url.url, f"{param}.image_url.url", limits))
            parts.append({"type": "image"})
        out.append({"role": m.role, "content": parts})
    return out, images
