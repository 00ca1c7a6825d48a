"""A feature's activating regions highlighted, the paper's way: the patch mask (activation above
~1e-5) upsampled bilinearly to the image, everything outside it darkened."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..scenes.generate import DARKEN  # as the scenes' region examples, which the scenes model explains from

ACTIVE = 1e-5


def region_mask(grid: list[list[float]], height: int, width: int, threshold: float = ACTIVE) -> np.ndarray:
    """``[height, width]`` in 0..1: the active patches, upsampled bilinearly."""
    active = (torch.tensor(grid, dtype=torch.float32) > threshold).float()[None, None]
    return F.interpolate(active, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def highlight(image: Image.Image, grid: list[list[float]], threshold: float = ACTIVE, dim: float = DARKEN) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = region_mask(grid, rgb.shape[0], rgb.shape[1], threshold)
    shaded = rgb * (dim + (1.0 - dim) * mask)[..., None]
    return Image.fromarray(shaded.round().clip(0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
