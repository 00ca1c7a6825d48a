"""Request and response bodies: OpenAI's chat completions plus our steering fields.

Steering travels at the top level of the body (``clamps``, ``steering``, ``return_unsteered``), so
the official ``openai`` client sends it with ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SteeringFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[int, Field(strict=True, ge=0, description="SAE feature (latent) index")]
    value: FiniteNumber
    mode: Literal["clamp", "add", "scale"] = "clamp"


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    features: list[SteeringFeature] = Field(default_factory=list)
    scope: Literal["all", "prompt", "generated", "image"] | None = Field(
        None, description="positions edited; default 'all' (delta) or 'prompt' (paper)")
    semantics: Literal["delta", "paper"] = "delta"


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: int = Field(0, ge=0, description="extension: sample among the k most likely tokens (0: all)")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = Field(False, description="extension (as vLLM): keep generating past end-of-sequence")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    clamps: dict[str, FiniteNumber] | None = Field(
        None, description="feature id -> value, mode clamp (shorthand for steering.features)")
    steering: Steering | None = None
    return_unsteered: bool = Field(False, description="also return the unsteered completion, same seed")

    @field_validator("clamps")
    @classmethod
    def _integer_keys(cls, v):
        for key in v or {}:
            if not key.isdigit():
                raise ValueError(f"clamps keys must be feature ids (non-negative integers), got {key!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=50, description="features reported per position and per pool")
    features: list[Annotated[int, Field(strict=True, ge=0)]] | None = Field(
        None, max_length=32, description="features to return patch grids for (default: top pooled image features)")
    grid_features: int = Field(5, ge=0, le=32)
    positions: bool = Field(True, description="include the per-position list")


# -- responses (documented shapes; handlers build plain dicts with the same keys) ----------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedFeature(BaseModel):
    id: int
    value: float
    mode: str
    explanation: str | None = None


class AppliedSteering(BaseModel):
    features: list[AppliedFeature]
    scope: str
    semantics: str
    hookpoint: str | None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: dict | None = None


class UnsteeredCompletion(BaseModel):
    content: str
    finish_reason: str
    usage: Usage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    steering: AppliedSteering | None = None
    unsteered: UnsteeredCompletion | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmm-steer"
    sae: dict | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeatureInfo(BaseModel):
    id: int
    explanation: str | None
    hookpoint: str | None
    decoder_norm: float | None
    stats: dict


class FeatureHit(BaseModel):
    id: int
    explanation: str
    score: float
    contexts: list[str] = Field(default_factory=list, description="top-activating contexts (activating token in «»)")


class FeatureSearch(BaseModel):
    object: Literal["list"] = "list"
    query: str
    data: list[FeatureHit]


class ActiveFeature(BaseModel):
    id: int
    activation: float
    explanation: str | None = None


class InspectedPosition(BaseModel):
    position: int
    token: str
    kind: Literal["image", "text"]
    features: list[ActiveFeature]


class ImageGrid(BaseModel):
    index: int
    rows: int
    cols: int
    features: dict[str, list[list[float]]] = Field(
        description="feature id -> rows x cols activations over the image's patch grid (row-major)")


class Inspection(BaseModel):
    object: Literal["inspection"] = "inspection"
    hookpoint: str | None
    num_tokens: int
    image_tokens: int
    text_tokens: int
    positions: list[InspectedPosition] | None
    pooled: dict[Literal["image", "text"], list[ActiveFeature]]
    images: list[ImageGrid]
