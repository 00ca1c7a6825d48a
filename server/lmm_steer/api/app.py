"""The HTTP service: OpenAI-compatible chat completions with steering, feature catalog, inspect.

This layer turns JSON into the engine's request dataclasses and engine output back into JSON; it
never touches tensors or the model (that is the service's engine thread). ``create_app`` builds the
app: middleware, error handlers, and one router per resource (``routes/``), which reach the
service, settings and metrics through dependencies (``deps``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service import SteeringService
from .deps import count_error
from .errors import APIError, error_response, loc_to_param, most_specific
from .middleware import GuardMiddleware
from .openapi import openapi_without_422
from .routes import chat, features, health, inspect, models, scenes, steering, ui
from .routes.chat import ClientGone
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]

ROUTERS = (chat.router, models.router, features.router, steering.router, inspect.router, scenes.router,
           ui.router, health.router)


def _add_error_handlers(app: FastAPI, metrics) -> None:
    """Every error, from any route or from FastAPI itself, in OpenAI's shape, and counted."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        count_error(metrics, e)
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
        count_error(metrics, err)
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
        count_error(metrics, err)
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}", code="internal_error")
        count_error(metrics, err)
        return error_response(err)


def create_app(service: SteeringService, settings: ServerSettings | None = None, metrics=None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(
        title="lmm-steer", version="0.1.0",
        description="OpenAI-compatible chat completions with per-request SAE feature steering.",
    )
    app.state.service, app.state.settings, app.state.metrics = service, settings, metrics
    app.openapi = openapi_without_422(app)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics, service=service)
    _add_error_handlers(app, metrics)
    for router in ROUTERS:
        app.include_router(router)
    ui.mount_static(app)
    return app
