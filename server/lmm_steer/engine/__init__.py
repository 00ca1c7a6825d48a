"""The steering engine: SAE edits in the residual stream, continuous batching, CUDA-graph decode."""

from .engine import (
    Engine,
    EngineConfig,
    EngineError,
    GenerationRequest,
    GenerationResult,
    StepOutput,
    TokenEvent,
)
from .sampling import SamplingParams
from .steering import FeatureEdit, SteeringSpec

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "FeatureEdit",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "SteeringSpec",
    "StepOutput",
    "TokenEvent",
]
