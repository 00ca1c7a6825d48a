"""ASGI middleware in front of every route: body size, content type, API keys, draining."""

from __future__ import annotations

import hmac
import json

from ..service import SHUTTING_DOWN
from .errors import AUTH_CHALLENGE, APIError, error_body
from .settings import ServerSettings

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

