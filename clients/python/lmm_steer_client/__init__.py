"""Client SDK for lmm-steer: chat with SAE feature steering, feature search, inspect, sweeps."""

from .client import AsyncChatStream, AsyncClient, ChatResult, ChatStream, Client, Feature, FeatureHit, Scene
from .errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from .heatmap import render_heatmap
from .steering import Steering

__all__ = [
    "APIConnectionError", "APIError", "AsyncChatStream", "AsyncClient", "AuthenticationError", "BadRequestError", "ChatResult",
    "ChatStream", "Client", "Feature", "FeatureHit", "NotFoundError", "RateLimitError", "Scene", "ServerError",
    "Steering", "render_heatmap",
]
