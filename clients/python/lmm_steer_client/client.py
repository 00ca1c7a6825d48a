"""Sync and async clients for lmm-steer. Only httpx and pydantic; Pillow optional (heatmaps)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from .errors import APIConnectionError, APIError, raise_for_error
from .steering import Steering

# The retry policy (see ``Client``): statuses where the server did not take the request and says
# so, or where a load balancer in front of it lost the replica that had it.
RETRY_STATUSES = (429, 502, 503, 504)
# Transport failures where the request may be sent again: the connection was refused or reset, or
# closed before an answer. Timeouts are not among them: the server may still be working on it.
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
SWEEP_TEMPERATURE = 0.0  # greedy: a sweep compares values of one feature, and sampling would add differences of its own


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResult(BaseModel):
    id: str
    text: str
    finish_reason: str
    usage: Usage | None = None
    steering: dict | None = None
    unsteered_text: str | None = None
    raw: dict = Field(default_factory=dict, repr=False)

    @classmethod
    def from_response(cls, body: dict) -> ChatResult:
        choice = body["choices"][0]
        unsteered = body.get("unsteered") or {}
        return cls(id=body["id"], text=choice["message"]["content"], finish_reason=choice["finish_reason"],
                   usage=body.get("usage"), steering=body.get("steering"), unsteered_text=unsteered.get("content"),
                   raw=body)


class Feature(BaseModel):
    id: int
    explanation: str | None = None
    hookpoint: str | None = None
    decoder_norm: float | None = None
    stats: dict = Field(default_factory=dict)


class Scene(BaseModel):
    """A synthetic scene from ``POST /v1/scenes``, with its ground truth (the generator the scenes
    model was trained on). ``image`` is a data URL: pass ``scene.png`` (bytes) wherever an image goes."""

    seed: int
    index: int
    image: str = Field(repr=False)
    caption: str
    objects: list[dict] = Field(default_factory=list)
    questions: list[dict] = Field(default_factory=list)

    @property
    def png(self) -> bytes:
        return base64.b64decode(self.image.split(",", 1)[1])

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.png)
        return Path(path)


class FeatureHit(BaseModel):
    id: int
    explanation: str | None = None
    score: float
    contexts: list[str] = Field(default_factory=list)


def _image_part(image) -> dict:
    """A path, bytes or PIL image -> an ``image_url`` content part with a data URL."""
    if isinstance(image, str | Path):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    elif hasattr(image, "save"):  # PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"image must be a path, bytes or PIL image, got {type(image).__name__}")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def build_body(messages=None, prompt=None, images=(), clamps=None, steering=None, preset=None, **params) -> dict:
    if messages is None:
        if prompt is None:
            raise ValueError("give messages or prompt")
        content = [_image_part(im) for im in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
    elif images:
        raise ValueError("images go inside messages when messages are given")
    body = {"messages": messages, **{k: v for k, v in params.items() if v is not None}}
    if clamps:
        steering = (steering or Steering())
        for feature, value in clamps.items():
            steering.clamp(int(feature), value)
    if preset is not None:
        if isinstance(steering, dict):
            steering = {**steering, "preset": preset}
        else:
            steering = (steering or Steering()).preset(preset)
    if steering is not None:
        body["steering"] = steering.to_dict() if isinstance(steering, Steering) else steering
    return body


def retry_after_seconds(response: httpx.Response | None) -> float | None:
    """A response's ``Retry-After`` in seconds (a number or an HTTP date), if it has a valid one."""
    if response is None or "retry-after" not in response.headers:
        return None
    value = response.headers["retry-after"].strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime

    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Attempts:
    """One call's retries: how many are left and how much waiting the budget still allows."""

    def __init__(self, client: _Base) -> None:
        self.client, self.retries, self.waited = client, 0, 0.0

    def delay(self, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again, or None: retries off, none left, or the wait would
        pass the budget (a ``Retry-After`` longer than the budget is not waited for)."""
        c = self.client
        if not c.retry or self.retries >= c.max_retries:
            return None
        wait = c._delay(self.retries, response)
        if self.waited + wait > c.retry_budget:
            return None
        self.retries += 1
        self.waited += wait
        c.retries_made += 1
        return wait


class _Base:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0, retry_budget: float = 30.0,
                 retry: bool = True) -> None:
        self.base_url = (base_url or os.environ.get("LMM_STEER_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key or os.environ.get("LMM_STEER_API_KEY")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.max_backoff, self.retry_budget, self.retry = max_backoff, retry_budget, retry
        self.retries_made = 0  # retries this client has made, over all its calls

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """The wait before retry ``attempt`` (0, 1, ...): the response's ``Retry-After`` plus up to
        a quarter more (never sooner than asked, and clients told the same do not come back
        together), else exponential backoff capped at ``max_backoff``, jittered to 50-100%."""
        after = retry_after_seconds(response)
        if after is not None:
            return after * (1 + random.random() / 4)
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)


class Client(_Base):
    """``Client("http://localhost:8000").chat(prompt="...", clamps={1234: 50})``.

    Retries. Every call of this SDK is idempotent: none changes what the server holds (a chat
    completion is computed, not stored; search, inspect, models, scenes and suggest only read), so
    a call that fails in a way that says the server did not answer it is sent again, transparently:

    - status 429 (queue full) or 503 (draining, or a balancer with no replica ready), after the
      response's ``Retry-After`` when it has one; 502 or 504 (a balancer lost the replica that had
      the request);
    - a connection refused, reset or closed before the answer (not a timeout: the server may still
      be working on it, and a second copy would only add load).

    A stream (``chat(stream=True)``) is retried the same way until its first token reaches the
    caller (a draining server's error event before any token counts as a 503), never after: the
    caller has seen part of an answer, and a new one would not continue it.

    Bounded: at most ``max_retries`` retries (default 3) per call, and at most ``retry_budget``
    seconds of waiting between them (default 30; a ``Retry-After`` that would pass it is not waited
    for, the error is raised). Waits are jittered: ``Retry-After`` plus up to a quarter more, else
    ``backoff`` x 2^n (default 0.5 s, capped at ``max_backoff``, 8 s) at 50-100%. ``retry=False``
    turns retrying off: the first failure is raised. ``retries_made`` counts the retries made.
    Other errors (400, 401, 404, 500, ...) are raised at once as typed exceptions."""

    def __init__(self, *args, transport: httpx.BaseTransport | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                  transport=transport)
        self.features = _Features(self)

    def close(self) -> None:
        self._http.close()

    def _sleep(self, seconds: float) -> None:  # the wait between retries (a test replaces it)
        time.sleep(seconds)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        attempts = _Attempts(self)
        while True:
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                wait = attempts.delay(None) if isinstance(e, RETRY_ERRORS) else None
                if wait is None:
                    raise APIConnectionError(f"{method} {path}: {e}") from e
                self._sleep(wait)
                continue
            if r.status_code in RETRY_STATUSES:
                wait = attempts.delay(r)
                if wait is not None:
                    self._sleep(wait)
                    continue
            raise_for_error(r)
            return r

    def chat(self, messages=None, *, prompt=None, images=(), clamps=None, steering=None, stream=False,
             return_unsteered=False, seed=None, max_tokens=None, temperature=None, **params):
        """One completion; ``stream=True`` returns a ChatStream of text deltas instead of a ChatResult.

        ``temperature=None`` (the default, streaming or not) sends no temperature, so the server's
        default applies: 1.0, sampled, as in OpenAI's API. Pass ``temperature=0`` for greedy,
        reproducible output (or a ``seed`` to make sampling reproducible)."""
        body = build_body(messages, prompt, images, clamps, steering, seed=seed, max_tokens=max_tokens,
                          temperature=temperature, return_unsteered=return_unsteered or None, **params)
        if stream:
            return ChatStream(self, body)
        return ChatResult.from_response(self._request("POST", "/v1/chat/completions", json=body).json())

    def models(self) -> list[dict]:
        """``GET /v1/models``: the served model, then one entry per steering preset (its ``preset``
        holds name, description and steering)."""
        return self._request("GET", "/v1/models").json()["data"]

    def scene(self, seed: int | None = None, index: int = 0) -> Scene:
        """Scene ``index`` of ``seed`` (a random seed when None) with its caption, objects and
        questions with their answers; the same scene ``lmm-steer scenes generate --seed`` writes."""
        body = {"index": index, **({"seed": seed} if seed is not None else {})}
        return Scene.model_validate(self._request("POST", "/v1/scenes", json=body).json())

    def suggest(self, text: str, *, strength: float = 1.0, max_features: int = 1, limit: int = 10) -> dict:
        """The edits ``Steering().concept(text)`` would apply, and the nearest features, without generating."""
        return self._request("POST", "/v1/steering/suggest", json={
            "text": text, "strength": strength, "max_features": max_features, "limit": limit}).json()

    def inspect(self, messages=None, *, prompt=None, images=(), features=None, top_k=5, positions=True) -> dict:
        body = build_body(messages, prompt, images)
        body.update({"top_k": top_k, "positions": positions})
        if features:
            body["features"] = list(features)
        return self._request("POST", "/v1/inspect", json=body).json()

    def sweep(self, prompt: str, *, feature: int, values, mode: str = "clamp", scope: str | None = None,
              concurrency: int = 4, temperature: float = SWEEP_TEMPERATURE, **chat_kw) -> list[ChatResult]:
        """One completion per value of one feature, issued concurrently (at most ``concurrency``),
        in the order of ``values``; ``scope`` ("image", "generated", ...) limits where the edit acts.

        Greedy by default (``temperature=0``, unlike ``chat``), so the completions differ only by
        the feature's value; pass ``temperature`` (and a ``seed``) to sample instead."""
        from concurrent.futures import ThreadPoolExecutor

        def one(value):
            return self.chat(prompt=prompt, steering=_one_edit(feature, value, mode, scope), temperature=temperature,
                             **chat_kw)

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, values))


class ChatStream:
    """Iterate text deltas; ``.result`` holds the final ChatResult once the stream ends."""

    def __init__(self, client: Client, body: dict) -> None:
        self._client, self._body = client, {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        # retried as Client's calls until the first token has been yielded, never after
        attempts, started = _Attempts(self._client), False
        while True:
            state, refused = _stream_state(), None
            try:
                with self._client._http.stream("POST", "/v1/chat/completions", json=self._body) as r:
                    if r.status_code >= 400:
                        r.read()
                        wait = attempts.delay(r) if r.status_code in RETRY_STATUSES else None
                        if wait is not None:
                            self._client._sleep(wait)
                            continue
                        refused = r  # raised below, outside the handler for failures mid-stream
                    else:
                        for line in r.iter_lines():
                            delta = _consume(state, line)
                            if delta:
                                started = True
                                yield delta
            except (httpx.TransportError, APIError) as e:  # a transport failure, or an error event
                wait = None if started else _stream_retry(attempts, e)
                if wait is None:
                    raise _as_sdk_error(e, started) from e
                self._client._sleep(wait)
                continue
            if refused is not None:
                raise_for_error(refused)
            self.result = _result(state)
            return


class _Features:
    def __init__(self, client) -> None:
        self._client = client

    def get(self, feature: int) -> Feature:
        return Feature(**self._client._request("GET", f"/v1/features/{int(feature)}").json())

    def search(self, text: str, limit: int = 10) -> list[FeatureHit]:
        body = self._client._request("GET", "/v1/features", params={"q": text, "limit": limit}).json()
        return [FeatureHit(**hit) for hit in body["data"]]


class AsyncClient(_Base):
    """The same calls, awaitable, with the same retries as ``Client``; ``chat_stream`` returns an
    async iterator of text deltas (retried until its first token, as ``Client.chat(stream=True)``)."""

    def __init__(self, *args, transport: httpx.AsyncBaseTransport | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _sleep(self, seconds: float) -> None:  # the wait between retries (a test replaces it)
        await asyncio.sleep(seconds)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        attempts = _Attempts(self)
        while True:
            try:
                r = await self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                wait = attempts.delay(None) if isinstance(e, RETRY_ERRORS) else None
                if wait is None:
                    raise APIConnectionError(f"{method} {path}: {e}") from e
                await self._sleep(wait)
                continue
            if r.status_code in RETRY_STATUSES:
                wait = attempts.delay(r)
                if wait is not None:
                    await self._sleep(wait)
                    continue
            raise_for_error(r)
            return r

    async def chat(self, messages=None, *, prompt=None, images=(), clamps=None, steering=None,
                   return_unsteered=False, seed=None, max_tokens=None, temperature=None, **params) -> ChatResult:
        """One completion. ``temperature=None`` (the default) sends no temperature, so the server's
        default applies: 1.0, sampled, as in OpenAI's API; pass ``temperature=0`` for greedy output."""
        body = build_body(messages, prompt, images, clamps, steering, seed=seed, max_tokens=max_tokens,
                          temperature=temperature, return_unsteered=return_unsteered or None, **params)
        r = await self._request("POST", "/v1/chat/completions", json=body)
        return ChatResult.from_response(r.json())

    async def scene(self, seed: int | None = None, index: int = 0) -> Scene:
        """As ``Client.scene``."""
        body = {"index": index, **({"seed": seed} if seed is not None else {})}
        return Scene.model_validate((await self._request("POST", "/v1/scenes", json=body)).json())

    def chat_stream(self, messages=None, *, prompt=None, images=(), clamps=None, steering=None,
                    **params) -> AsyncChatStream:
        """``async for delta in client.chat_stream(...)``; ``.result`` holds the ChatResult afterwards.

        With no ``temperature`` the server's default applies: 1.0, sampled, as in OpenAI's API;
        pass ``temperature=0`` for greedy output."""
        return AsyncChatStream(self, build_body(messages, prompt, images, clamps, steering, **params))

    async def sweep(self, prompt: str, *, feature: int, values, mode: str = "clamp", scope: str | None = None,
                    concurrency: int = 4, temperature: float = SWEEP_TEMPERATURE, **chat_kw) -> list[ChatResult]:
        """As ``Client.sweep``: one completion per value, at most ``concurrency`` in flight, in the
        order of ``values``; greedy by default (``temperature=0``), pass ``temperature`` to sample."""
        slots = asyncio.Semaphore(max(1, concurrency))

        async def one(value):
            async with slots:
                return await self.chat(prompt=prompt, steering=_one_edit(feature, value, mode, scope),
                                       temperature=temperature, **chat_kw)

        return list(await asyncio.gather(*(one(value) for value in values)))


def _one_edit(feature: int, value: float, mode: str, scope: str | None) -> Steering:
    """A sweep's steering at one value: that feature alone (the sweep holds every other feature off)."""
    steering = getattr(Steering(), mode)(feature, value)
    return steering.scope(scope) if scope else steering


SHUTTING_DOWN = "server_shutting_down"  # the server's error code while it drains


def _stream_retry(attempts: _Attempts, e: Exception) -> float | None:
    """The wait before retrying a stream that failed with ``e`` before its first token, or None."""
    if isinstance(e, httpx.TransportError):
        return attempts.delay(None) if isinstance(e, RETRY_ERRORS) else None
    if isinstance(e, APIError) and e.status in RETRY_STATUSES:  # an error event before any token
        return attempts.delay(None)
    return None


def _as_sdk_error(e: Exception, started: bool) -> Exception:
    if isinstance(e, APIError):
        return e
    after = " after its first token (a stream is not retried once the caller has part of an answer)" if started else ""
    return APIConnectionError(f"POST /v1/chat/completions: {e}{after}")


def _stream_state():
    return {"parts": [], "finish": None, "usage": None, "extra": {}, "id": ""}


def _consume(state: dict, line: str) -> str | None:
    """Fold one SSE line into ``state``; returns the text delta it carried, if any."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    event = json.loads(line[6:])
    if "error" in event:  # a stream's failure after its 200: a draining server's counts as its 503
        code = (event["error"] or {}).get("code")
        raise_for_error(httpx.Response(503 if code == SHUTTING_DOWN else 500, json=event))
    state["id"] = event.get("id", state["id"])
    if event.get("usage"):
        state["usage"] = event["usage"]
    delta = None
    for choice in event.get("choices", []):
        delta = choice.get("delta", {}).get("content") or None
        if delta:
            state["parts"].append(delta)
        if choice.get("finish_reason"):
            state["finish"] = choice["finish_reason"]
            state["extra"] = {k: event.get(k) for k in ("steering", "unsteered")}
    return delta


def _result(state: dict) -> ChatResult:
    unsteered = state["extra"].get("unsteered") or {}
    return ChatResult(id=state["id"], text="".join(state["parts"]), finish_reason=state["finish"] or "stop",
                      usage=state["usage"], steering=state["extra"].get("steering"),
                      unsteered_text=unsteered.get("content"))


class AsyncChatStream:
    def __init__(self, client: AsyncClient, body: dict) -> None:
        self._client, self._body = client, {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.result: ChatResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        # retried as Client's calls until the first token has been yielded, never after
        attempts, started = _Attempts(self._client), False
        while True:
            state, refused = _stream_state(), None
            try:
                async with self._client._http.stream("POST", "/v1/chat/completions", json=self._body) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        wait = attempts.delay(r) if r.status_code in RETRY_STATUSES else None
                        if wait is not None:
                            await self._client._sleep(wait)
                            continue
                        refused = r  # raised below, outside the handler for failures mid-stream
                    else:
                        async for line in r.aiter_lines():
                            delta = _consume(state, line)
                            if delta:
                                started = True
                                yield delta
            except (httpx.TransportError, APIError) as e:  # a transport failure, or an error event
                wait = None if started else _stream_retry(attempts, e)
                if wait is None:
                    raise _as_sdk_error(e, started) from e
                await self._client._sleep(wait)
                continue
            if refused is not None:
                raise_for_error(refused)
            self.result = _result(state)
            return
