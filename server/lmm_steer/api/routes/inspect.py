"""``POST /v1/inspect``: which features fire on a prompt, per position, pooled, and per image patch."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ...engine import EngineError, GenerationRequest, SamplingParams
from ..deps import ServiceDep, SettingsDep, explanation, model_preset
from ..errors import APIError
from ..messages import template_messages
from ..openapi import POST_ERRORS, error_responses
from ..schemas import Inspection, InspectRequest, unsupported_in_messages

router = APIRouter()


def _texts(content) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part.text for part in content if part.type == "text"]


@router.post("/v1/inspect", response_model=Inspection, responses=error_responses(*POST_ERRORS))
async def inspect(body: InspectRequest, service: ServiceDep,
                  settings: SettingsDep):
    from ...engine.inspect import inspect_prompt

    model_preset(body.model, service, settings)  # a 404 for a model not served
    unsupported = unsupported_in_messages(body.messages)
    if unsupported is not None:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                       code="unsupported_parameter")
    if service.engine.sae is None:
        raise APIError(400, "this server has no SAE loaded", code="steering_unavailable")
    for i, f in enumerate(body.features or []):
        if f >= service.num_latents:
            raise APIError(400, f"feature {f} does not exist (the SAE has features 0..{service.num_latents - 1})",
                           param=f"features[{i}]", code="invalid_value")
    messages, images = await template_messages(body.messages, service, settings.images)
    req = GenerationRequest(messages=messages, images=images, sampling=SamplingParams(max_tokens=1))
    # the messages' own texts, in order: positions outside them are the chat template's
    contents = [text for m in body.messages for text in _texts(m.content)]

    def run(engine):
        seq = engine.prepare(req)
        return inspect_prompt(engine, seq.inputs, top_k=body.top_k, features=body.features,
                              grid_features=body.grid_features, positions=body.positions,
                              include_special_tokens=body.include_special_tokens,
                              include_template_tokens=body.include_template_tokens, contents=contents)

    try:
        result = await service.call(run)
    except EngineError as e:
        raise APIError(400, str(e), param=e.field, code="invalid_value") from None

    def explain(items):
        for it in items:
            it["explanation"] = explanation(service, it["id"])
        return items

    for kind in result["pooled"]:
        explain(result["pooled"][kind])
    for pos in result["positions"] or []:
        explain(pos["features"])
    result["hookpoint"] = service.engine.hookpoint
    result["object"] = "inspection"
    return JSONResponse(result)
