"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _TYPES.get(status, "invalid_request_error")


_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 501: "server_error", 503: "server_error"}

# The WWW-Authenticate challenge RFC 6750 asks a 401 to carry.
AUTH_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="lmm-steer"'}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error this server returns, from any route, has this shape (OpenAI's)."""

    error: ErrorDetail


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "literal", "json-or-python"}


def _is_type_tag(part: str) -> bool:
    # pydantic names the member of a union it tried (``str``, ``list[...]``, ``function-after[...]``)
    return part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "tagged-union"))


def loc_to_param(loc) -> str | None:
    """pydantic's ``("body", "steering", "features", 0, "value")`` -> ``steering.features[0].value``."""
    out = ""
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_type_tag(p):
            out += f".{p}" if out else str(p)
    return out or None


def most_specific(errors: list[dict]) -> dict:
    """Of pydantic's errors (one per union member tried), the one that went deepest into the input."""
    return max(errors, key=lambda e: len([p for p in e.get("loc", ()) if isinstance(p, int) or not _is_type_tag(p)]))
