"""The server's error shape, ``{"error": {"message", "type", "param", "code"}}``, as exceptions."""

from __future__ import annotations

import httpx


class LmmSteerError(Exception):
    pass


class APIConnectionError(LmmSteerError):
    """The server could not be reached."""


class APIError(LmmSteerError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(f"{status} {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class RateLimitError(APIError):
    pass


class ServerError(APIError):
    pass


def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {"message": response.text}
    cls = {401: AuthenticationError, 404: NotFoundError, 429: RateLimitError}.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else BadRequestError
    raise cls(response.status_code, err.get("message", ""), err.get("param"), err.get("code"), err.get("type"))
