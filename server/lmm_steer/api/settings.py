"""What the HTTP layer is configured with (``lmm-steer serve``'s options that are not the engine's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .images import ImageLimits
from .schemas import Preset


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 * 2**20
    images: ImageLimits = field(default_factory=ImageLimits)
    default_max_tokens: int = 256
    presets: dict[str, Preset] = field(default_factory=dict)  # name -> preset, checked against the SAE at start
