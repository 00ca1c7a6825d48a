"""Request and response bodies: OpenAI's chat completions plus our steering fields.

Steering travels at the top level of the body (``clamps``, ``steering``, ``return_unsteered``), so
the official ``openai`` client sends it with ``extra_body``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# Feature ids as JSON object keys: ASCII digits only ("²" and "١" are digits to str.isdigit), and
# short enough that int() stays cheap and the id fits the engine's int64 table.
FEATURE_KEY_PATTERN = r"^[0-9]{1,18}$"
_FEATURE_KEY = re.compile(FEATURE_KEY_PATTERN)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _valid_unicode(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot be encoded, tokenised or echoed back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains invalid Unicode (a lone surrogate at index {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _integral(value):
    # JSON has one number type, and JSON Schema's "integer" is any number without a fraction: 1.0 is
    # the integer 1 (as the published schema says). 1.5, "1" and true are still refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# an integer field of a request: strict (no "4", no true), but 4.0 is 4
Int = Annotated[int, BeforeValidator(_integral)]


def refused_unless(schema: dict, description: str):
    """A field this server refuses unless it holds one of a few harmless values: validated as
    anything (so the refusal names the field, code ``unsupported_parameter``), published as exactly
    the values it takes, so a body the schema allows is never refused."""
    return Annotated[Any, WithJsonSchema({**schema, "description": description})]


NULL = {"type": "null"}


class Request(BaseModel):
    """Request bodies take JSON types as they are (no "4" for 4, no 0 for false), as the OpenAI API."""

    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(Request):
    url: Text
    detail: Text | None = None


class TextPart(Request):
    type: Literal["text"]
    text: Text


class ImagePart(Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    # this server has no tool calling: a non-empty value is refused by name (400); the schema says null
    tool_calls: refused_unless(NULL, "not supported: absent or null (a non-empty value is refused, 400)") = None
    function_call: refused_unless(NULL, "not supported: absent or null (a non-empty value is refused, 400)") = None


class SteeringFeature(Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: Annotated[Int, Field(strict=True, ge=0, description="SAE feature (latent) index")]
    value: FiniteNumber
    mode: Literal["clamp", "add", "scale", "transfer"] = "clamp"
    source: Annotated[Int | None, Field(strict=True, ge=0, description=(
        "mode 'transfer' only: the feature whose activation, times value, is written along this one's "
        "direction wherever it fires (clamp the source at 0 beside it to swap one for the other)"))] = None
    where: Annotated[Int | None, Field(strict=True, ge=0, description=(
        "a gate: the edit acts only at positions where this feature fires (delta semantics)"))] = None
    when: Annotated[Int | None, Field(strict=True, ge=0, description=(
        "a condition on the request: the edit acts (on every position in scope, decode steps too) only if "
        "this feature fires somewhere in the prompt's unedited block output, e.g. a feature of colour "
        "questions (delta semantics)"))] = None
    when_on: Literal["prompt", "text"] | None = Field(None, description=(
        "where 'when' is read: 'prompt' (the default), every position; 'text', every position but the image's "
        "tokens, so a feature of a word decides by what the prompt says, not by what the picture holds"))


class SteeringConcept(Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    text: Annotated[Text, Field(min_length=1, max_length=200, description="a concept in words, e.g. 'the ocean'")]
    strength: Annotated[float, Field(ge=-4, le=4, allow_inf_nan=False, description=(
        "multiple of each chosen feature's calibrated value; negative pushes against the concept"))] = 1.0
    max_features: Annotated[Int, Field(ge=1, le=8, description="features the concept may resolve to")] = 1
    condition: bool = Field(True, description=(
        "keep the condition a measured feature's value comes with (its 'when': e.g. act only on prompts asking "
        "about colour, where the value was measured); false: act on every prompt"))


class Steering(Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    features: list[SteeringFeature] = Field(default_factory=list)
    concepts: list[SteeringConcept] = Field(
        default_factory=list, max_length=8,
        description="concepts resolved on the server to features and calibrated values (echoed in the response)")
    scope: Literal["all", "prompt", "generated", "image"] | None = Field(
        None, description="positions edited; default 'all' (delta) or 'prompt' (paper)")
    semantics: Literal["delta", "paper"] = "delta"
    preset: Annotated[Text | None, Field(description=(
        "a steering preset loaded at start (--presets); this steering's own edits apply on top of it: "
        "an edit of the same feature replaces the preset's, concepts add to its, and scope and semantics, "
        "when given, replace its"))] = None


PRESET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Preset(Request):
    """A named steering loaded at start; served as the model ``<model>:<name>``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: Annotated[str, Field(pattern=PRESET_NAME_PATTERN, description="letters, digits, '.', '_', '-'")]
    description: Annotated[Text, Field(min_length=1, max_length=500)]
    steering: Steering
    # ``preset fit``'s record: the data, the command, the candidates with their probe weights, the
    # selection figures and the controls' fitted parts; the server ignores it
    fit: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _not_nested(self):
        if self.steering.preset is not None:
            raise ValueError("a preset's steering cannot name another preset")
        if not (self.steering.features or self.steering.concepts or self.steering.semantics == "paper"):
            raise ValueError("a preset's steering needs features or concepts")
        return self


class StreamOptions(Request):
    include_usage: bool = False


# OpenAI fields that change what a completion means; this server cannot honour them, so they are
# refused by name rather than ignored (a caller asking for JSON output or tools must not get prose).
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                      "audio", "modalities", "prediction", "parallel_tool_calls", "web_search_options")


class ChatCompletionRequest(Request):
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Int = Field(0, ge=0, description="extension: sample among the k most likely tokens (0: all)")
    seed: Int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[Text | list[Text] | None, WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        NULL], "description": "up to 4 non-empty stop sequences"})] = None
    # what the schema says of the next ones is what the server takes: other values are refused (400)
    n: Annotated[Int, WithJsonSchema({"type": "integer", "const": 1, "description": "only 1"})] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: Annotated[Int | None, WithJsonSchema({"anyOf": [NULL, {"type": "integer", "const": 0}], "description": (
        "not supported: absent, null or 0 (logprobs gives the chosen tokens' log probabilities)")})] = None
    ignore_eos: bool = Field(False, description="extension (as vLLM): keep generating past end-of-sequence")
    presence_penalty: Annotated[float, WithJsonSchema({"type": "number", "const": 0, "description": "not supported: 0"})] = 0.0
    frequency_penalty: Annotated[float, WithJsonSchema({"type": "number", "const": 0, "description": "not supported: 0"})] = 0.0
    clamps: dict[str, FiniteNumber] | None = Field(
        None, description="feature id -> value, mode clamp (shorthand for steering.features)",
        json_schema_extra={"propertyNames": {"pattern": FEATURE_KEY_PATTERN}})
    steering: Steering | None = None
    return_unsteered: bool = Field(False, description="also return the unsteered completion, same seed")
    # OpenAI fields this server cannot honour: published as the values it takes, refused by name otherwise
    tools: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None
    tool_choice: refused_unless({"enum": ["none", None]}, "not supported: absent, null or 'none'") = None
    functions: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None
    function_call: refused_unless({"enum": ["none", None]}, "not supported: absent, null or 'none'") = None
    response_format: refused_unless(
        {"anyOf": [NULL, {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
                          "additionalProperties": False}]},
        "only {'type': 'text'}; anything else is refused (400)") = None
    logit_bias: refused_unless({"anyOf": [NULL, {"type": "object", "maxProperties": 0}]},
                               "not supported: absent, null or {}") = None
    audio: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None
    modalities: refused_unless(
        {"anyOf": [NULL, {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1}]},
        "only ['text']; anything else is refused (400)") = None
    prediction: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None
    parallel_tool_calls: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None
    web_search_options: refused_unless(NULL, "not supported: absent or null; anything else is refused (400)") = None

    @field_validator("clamps")
    @classmethod
    def _integer_keys(cls, v):
        for key in v or {}:
            if not _FEATURE_KEY.match(key):
                shown = key if len(key) <= 40 else key[:40] + "..."
                raise ValueError(f"clamps keys must be feature ids (ASCII digits, at most 18), got {shown!r}")
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


def unsupported_field(body: ChatCompletionRequest) -> str | None:
    """The first field of ``body`` that asks for something this server does not do, if any."""
    harmless = {"tool_choice": ("none",), "function_call": ("none",), "response_format": ({"type": "text"},),
                "modalities": (["text"],)}
    for name in UNSUPPORTED_FIELDS:
        value = getattr(body, name)
        if value is None or value in harmless.get(name, ()) or (name == "logit_bias" and value == {}):
            continue
        return name
    return unsupported_in_messages(body.messages)


def unsupported_in_messages(messages: list[Message]) -> str | None:
    """A message's tool call, named as ``messages[i].tool_calls``: this server has no tool calling."""
    for i, message in enumerate(messages):
        for name in ("tool_calls", "function_call"):
            if getattr(message, name):
                return f"messages[{i}].{name}"
    return None


class SuggestRequest(Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    # ``text``, as in ``steering.concepts[].text``; ``concept``, the field's earlier name, is still
    # taken (deprecated) so existing callers keep working
    text: Annotated[Text, Field(min_length=1, max_length=200, validation_alias=AliasChoices("text", "concept"),
                                description="the concept, in words (the deprecated name concept is also "
                                            "accepted)")]
    strength: Annotated[float, Field(ge=-4, le=4, allow_inf_nan=False)] = 1.0
    max_features: Annotated[Int, Field(ge=1, le=8)] = 1
    limit: Annotated[Int, Field(ge=1, le=50, description="nearest features listed as candidates")] = 10


class InspectRequest(Request):
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    top_k: Int = Field(5, ge=1, le=50, description="features reported per position and per pool")
    features: list[Annotated[Int, Field(strict=True, ge=0)]] | None = Field(
        None, max_length=32, description="features to return patch grids for (default: top pooled image features)")
    grid_features: Int = Field(5, ge=0, le=32)
    positions: bool = Field(True, description="include the per-position list")
    include_special_tokens: bool = Field(False, description=(
        "pool over the tokenizer's special tokens (chat-template markers such as <|im_start|>) and the "
        "first, attention-sink position too; by default they are left out of pooled (image tokens never are)"))
    include_template_tokens: bool = Field(False, description=(
        "pool over the chat template's other text too (role names, a system prompt the template adds); by "
        "default pooled covers the messages' own tokens"))


# -- responses (documented shapes; handlers build plain dicts with the same keys) ----------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedFeature(BaseModel):
    id: int
    value: float
    mode: str
    source: int | None = Field(None, description="a transfer's source feature (present for transfers only)")
    where: int | None = Field(None, description="a gated edit's gate feature (present for gated edits only)")
    when: int | None = Field(None, description="a conditioned edit's condition feature (present for those only)")
    when_on: str | None = Field(None, description="'text' for a condition read on the prompt's text alone "
                                                  "(present for those only)")
    acted: bool | None = Field(None, description=(
        "a conditioned edit's outcome: whether its condition fired in this prompt (present for those only)"))
    explanation: str | None = None
    concept: str | None = Field(None, description="the concept this edit came from, if any")


class AppliedConcept(BaseModel):
    text: str
    strength: float
    features: list[int] = Field(description="the features the concept resolved to (their edits are in features)")


class AppliedSteering(BaseModel):
    features: list[AppliedFeature]
    concepts: list[AppliedConcept] = Field(default_factory=list)
    scope: str
    semantics: str
    hookpoint: str | None
    preset: str | None = Field(None, description="the preset these edits started from, if any")


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
    multimodal: bool = Field(False, description="whether the model takes images (image_url content parts)")
    parent: str | None = Field(None, description="for a preset: the model it steers (as vLLM lists LoRA adapters)")
    preset: dict | None = Field(None, description="for a preset: its name, description and steering")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeatureImage(BaseModel):
    url: str = Field(description="the image with the feature's active patches highlighted (PNG)")
    activation: float | None = Field(description="what the catalog ranked the image by (see ranked_by)")
    peak_patch: float | None = Field(None, description="the largest activation in the image's patch grid (base view)")
    mean_patch: float | None = Field(None, description="the mean activation over the image's patch grid")
    patches: int | None = Field(None, description="patches in the grid")
    ranked_by: Literal["mean_patch", "peak_patch", "strongest_token"] | None = Field(None, description=(
        "what activation is: the mean over the grid's patches (sae explain's top images, the image shown alone), "
        "its peak patch, or the strongest token of the catalog example the image came from (sae catalog: any "
        "token of the conversation, text or a patch outside the grid's base view)"))


class FeatureContext(BaseModel):
    text: str = Field(description="a top-activating context, the activating token in «»")
    activation: float | None
    template_chars: int = Field(description=(
        "how many leading characters of text are the chat template's (a system prompt it adds, role names), "
        "not the corpus's; when the « falls within them the feature fired on the template"))


class SteerProposal(BaseModel):
    value: float | None = Field(description="clamp value to try first (null: nothing to base one on)")
    scope: Literal["all", "prompt", "generated", "image"] | None = Field(
        description="the scope the value is meant for (null: the request's default)")
    calibrated: bool = Field(description="whether value is the catalog's calibrated one (stats.steer.value)")
    population: Literal["image", "text"] | None = Field(description=(
        "for an uncalibrated value, where the feature fires most: image patches (its top images' peak patch "
        "reaches a quarter of its maximum) or tokens at large"))
    basis: str = Field(description="how the value was chosen, in words")


class FeatureInfo(BaseModel):
    id: int
    explanation: str | None
    hookpoint: str | None
    decoder_norm: float | None
    stats: dict
    scores: dict | None = Field(None, description="the explanation's scores (`sae score`): IoU, CLIP score, ...")
    top_images: list[FeatureImage] = Field(default_factory=list)
    max_activation_over: Literal["any_token", "top_image_patches"] | None = Field(None, description=(
        "where stats.max_activation was taken: any one token of the catalog's corpus (sae catalog: text and "
        "every image token), or the top images' patches (a catalog written by sae explain alone)"))
    contexts: list[FeatureContext] = Field(default_factory=list, description="stats.top_contexts, chat template marked")
    proposal: SteerProposal | None = None


class FeatureHit(BaseModel):
    id: int
    explanation: str | None = Field(description="null where the catalog has none, as in GET /v1/features/{id}")
    score: float
    contexts: list[str] = Field(default_factory=list, description="top-activating contexts (activating token in «»)")
    template_chars: list[int] = Field(default_factory=list, description=(
        "for each context, how many of its leading characters are the chat template's text (see FeatureContext)"))


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
    token: str = Field(description="the tokenizer's raw piece (BPE markers such as 'Ġ' included)")
    text: str = Field(description="the token decoded alone, as it reads in the prompt")
    kind: Literal["image", "text"]
    special: bool = Field(description="a special token of the tokenizer (image placeholders excepted)")
    template: bool = Field(description="put there by the chat template, not by the messages: special tokens, "
                                       "role headers, a system prompt the template adds")
    pooled: bool = Field(description="counted in pooled (see include_special_tokens and include_template_tokens)")
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
    pooled_tokens: dict[Literal["image", "text"], int] = Field(
        description="positions of each kind that pooled averages over")
    residual_norm: dict[Literal["image", "text"], float | None] = Field(
        description="median L2 norm of the hookpoint's output over the pooled positions of each kind: the scale a "
                    "clamp's value times the feature's decoder norm is added to")
    positions: list[InspectedPosition] | None
    pooled: dict[Literal["image", "text"], list[ActiveFeature]] = Field(
        description="each kind's features by mean activation over its pooled positions")
    images: list[ImageGrid]


class ConceptCandidate(BaseModel):
    id: int
    similarity: float
    value: float | None = Field(description="clamp value at strength 1 (calibrated, else 3 x max activation); "
                                            "null where calibration found none")
    calibrated: bool
    text: str = Field(description="what the feature stands for: its explanation, else the words it fires on")


class Suggestion(BaseModel):
    object: Literal["steering.suggestion"] = "steering.suggestion"
    text: str
    concept: str = Field(description="the same as text (deprecated: kept for callers of the earlier name)")
    strength: float
    edits: list[AppliedFeature] = Field(description="what steering.concepts would apply")
    candidates: list[ConceptCandidate]


# -- scenes (the generator the scenes model was trained on, one scene at a time) -------------------

class SceneRequest(Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    seed: Annotated[Int, Field(ge=0, le=2**31 - 1, description="generator seed (default: a random one)")] | None = None
    index: Annotated[Int, Field(ge=0, le=10**6, description="scene number within the seed")] = 0


class SceneObjectInfo(BaseModel):
    shape: str
    colour: str
    size: str
    bbox: list[int] = Field(description="COCO [x, y, w, h] of the visible part, in pixels")
    occlusion: float


class SceneQuestion(BaseModel):
    type: str = Field(description="colour, shape, count, exist, left or right")
    question: str
    prompt: str = Field(description="the question with the answer-format hint the scenes model was trained on")
    answer: str
    difficulty: list[str]


class SceneInfo(BaseModel):
    object: Literal["scene"] = "scene"
    seed: int
    index: int
    width: int
    height: int
    image: str = Field(description="the scene as a data:image/png;base64 URL, ready for an image_url part")
    caption: str
    background: str
    objects: list[SceneObjectInfo]
    questions: list[SceneQuestion]
