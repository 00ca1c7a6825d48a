"""``POST /v1/chat/completions``: OpenAI chat completions with steering, streamed or not."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...engine import EngineError, GenerationRequest, GenerationResult, SamplingParams
from ...engine.engine import NON_FINITE_CODE
from ...service import SHUTTING_DOWN, QueueFull, RequestFailed, SteeringService
from ..deps import MetricsDep, ServiceDep, SettingsDep, count_error
from ..errors import APIError, error_body
from ..messages import template_messages
from ..openapi import POST_ERRORS, error_responses
from ..schemas import ChatCompletion, ChatCompletionRequest, unsupported_field
from ..settings import ServerSettings
from ..steering_request import ResolvedSteering, applied, param_for, preset_of, resolve_steering

router = APIRouter()


class ClientGone(Exception):
    """The caller closed its connection before its answer was ready."""


def failure(e: RequestFailed, body: ChatCompletionRequest | None = None) -> APIError:
    """An engine failure of one request, as the error its caller gets."""
    if e.code == SHUTTING_DOWN:
        return APIError(503, str(e), code=SHUTTING_DOWN, headers={"Retry-After": "5"})
    if e.code == NON_FINITE_CODE and body is not None and (body.clamps or body.steering):
        return APIError(400, str(e), param="steering" if body.steering else "clamps", code=NON_FINITE_CODE)
    if e.code == NON_FINITE_CODE:
        return APIError(500, str(e), code=NON_FINITE_CODE)
    return APIError(500, f"the request failed: {e}", code="internal_error")


async def _unless_disconnected(request: Request, work):
    """Await ``work`` unless the client disconnects first; then cancel it (so its engine row is
    freed at the next decode step, as a closed stream's is) and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # the handler itself is cancelled (a server stopping without a drain): stop the work too,
        # so the caller's ``stream.aclose()`` does not meet a generator that is still running
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - nobody is left to tell
        pass
    raise ClientGone


def _usage(result: GenerationResult) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def _logprobs(result: GenerationResult, service: SteeringService) -> dict | None:
    if result.logprobs is None:
        return None
    tok = service.engine.loaded.tokenizer
    content = []
    for tid, lp in zip(result.token_ids, result.logprobs, strict=True):
        text = tok.decode([tid])
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content}


def _check_supported(body: ChatCompletionRequest, service: SteeringService) -> None:
    """Fields the server cannot honour are refused by name, never ignored."""
    unsupported = unsupported_field(body)
    if unsupported is not None:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                       code="unsupported_parameter")
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported: only n=1", param="n", code="unsupported_value")
    if body.top_logprobs:
        raise APIError(400, "top_logprobs is not supported (logprobs of the chosen tokens are)",
                       param="top_logprobs", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported", param=name, code="unsupported_value")
    if service.engine.sae is None and (body.clamps or body.steering):
        raise APIError(400, "this server has no SAE loaded, so it cannot steer",
                       param="steering" if body.steering else "clamps", code="steering_unavailable")


def _generation_request(body: ChatCompletionRequest, settings: ServerSettings, messages, images, steering,
                        seed) -> GenerationRequest:
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=seed, stop=list(body.stop or []), logprobs=body.logprobs,
                              ignore_eos=body.ignore_eos)
    return GenerationRequest(messages=messages, images=images, sampling=sampling, steering=steering)


async def _start(service: SteeringService, body: ChatCompletionRequest, req: GenerationRequest,
                 resolved: ResolvedSteering | None = None):
    """Queue a request and wait for its first output (so validation errors become 4xx)."""
    stream = service.generate(req)
    try:
        first = await stream.__anext__()
    except EngineError as e:
        raise APIError(400, str(e), param=param_for(e.field, body, resolved), code="invalid_value") from None
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)}) from None
    except RequestFailed as e:
        raise failure(e, body) from None
    return first, stream


async def _finish(first, stream, body: ChatCompletionRequest) -> GenerationResult:
    if isinstance(first, GenerationResult):
        return first
    try:
        async for item in stream:
            if isinstance(item, GenerationResult):
                return item
    except RequestFailed as e:
        raise failure(e, body) from None
    raise APIError(500, "the request ended without a result", code="internal_error")


async def _results(first, stream, body, unsteered_task):
    result = await _finish(first, stream, body)
    return result, (await unsteered_task if unsteered_task else None)


async def _sse(service: SteeringService, metrics, first, stream, unsteered_task, cid, created,
               resolved: ResolvedSteering, include_usage, model_name):
    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                   **extra}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        item = first
        while True:
            if isinstance(item, GenerationResult):
                extra = {"steering": applied(resolved, service, item.idle_edits)}
                if unsteered_task is not None:
                    u = await unsteered_task
                    extra["unsteered"] = {"content": u.text, "finish_reason": u.finish_reason, "usage": _usage(u)}
                yield chunk({}, item.finish_reason, **extra)
                if include_usage:
                    payload = {"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": model_name, "choices": [], "usage": _usage(item)}
                    yield f"data: {json.dumps(payload)}\n\n"
                break
            if item.text_delta:
                yield chunk({"content": item.text_delta})
            item = await stream.__anext__()
    except RequestFailed as e:
        err = failure(e)
        count_error(metrics, err)
        yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
    finally:
        await stream.aclose()  # a client that went away: abort, free the row
        if unsteered_task is not None and not unsteered_task.done():
            unsteered_task.cancel()
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={
    200: {"content": {"text/event-stream": {"description": "with stream: chat.completion.chunk events, "
                                            "then data: [DONE]"}}},
    **error_responses(*POST_ERRORS)})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           service: ServiceDep,
                           settings: SettingsDep, metrics: MetricsDep):
    preset = preset_of(body, service, settings)
    _check_supported(body, service)
    resolved = await asyncio.get_running_loop().run_in_executor(None, resolve_steering, body, service, preset)
    steering = resolved.spec
    if preset is not None and metrics is not None:
        metrics.preset_requests.labels(metrics.model_name, preset.name).inc()
    # the model a stock client asked for is the model it is answered as (``<model>:<preset>``)
    by_model = preset is not None and body.model not in (None, service.model_name)
    model_name = f"{service.model_name}:{preset.name}" if by_model else service.model_name
    messages, images = await template_messages(body.messages, service, settings.images)
    seed = body.seed
    if body.return_unsteered and seed is None and body.temperature > 0:
        seed = secrets.randbits(63)  # both completions must draw the same random numbers
    req = _generation_request(body, settings, messages, images, steering, seed)
    unsteered_task = None
    first, stream = await _start(service, body, req, resolved)
    if body.return_unsteered:
        twin = _generation_request(body, settings, messages, images, None, seed)
        unsteered_task = asyncio.create_task(service.complete(twin, bounded=False))  # admitted with its request
    cid = f"chatcmpl-{req.request_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(service, metrics, first, stream, unsteered_task, cid, created, resolved, include_usage, model_name),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
        )
    try:
        result, unsteered = await _unless_disconnected(request, _results(first, stream, body, unsteered_task))
    except RequestFailed as e:  # the unsteered twin failed
        raise failure(e) from None
    finally:
        if unsteered_task and not unsteered_task.done():
            unsteered_task.cancel()
        await stream.aclose()  # a caller that went away: abort, free the row (a no-op once finished)
    body_out = {
        "id": cid, "object": "chat.completion", "created": created, "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": _logprobs(result, service)}],
        "usage": _usage(result), "steering": applied(resolved, service, result.idle_edits),
    }
    if unsteered is not None:
        body_out["unsteered"] = {"content": unsteered.text, "finish_reason": unsteered.finish_reason,
                                 "usage": _usage(unsteered)}
    return JSONResponse(body_out)
