"""What the published schema says about errors: every route answers them in one shape, and these
are the ones each kind of route can give."""

from __future__ import annotations

from fastapi import FastAPI

from .errors import ErrorResponse

ERRORS = {
    400: "invalid request: the message says what, param names the field",
    401: "missing or invalid API key (only when the server has keys; WWW-Authenticate: Bearer)",
    404: "no such model, feature or route",
    405: "method not allowed (Allow lists the methods)",
    413: "request body over --max-body-bytes",
    415: "body is not application/json",
    429: "queue full (Retry-After)",
    500: "this request failed inside the engine (others are unaffected)",
    501: "this server lacks what the route needs; the message names it (a feature catalog, an embedding model)",
    503: "the server is shutting down (Retry-After)",
}
POST_ERRORS = (400, 401, 404, 405, 413, 415, 429, 500, 503)
GET_ERRORS = (400, 401, 404, 405)


def error_responses(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


def openapi_without_422(app: FastAPI):
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
