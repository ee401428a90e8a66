"""Errors in OpenAI's JSON shape, with the HTTP status each branch of the error tree means.

    InvalidRequest, request bodies that do not validate -> 400   Overloaded -> 429 + Retry-After
    no or wrong API key -> 401   unknown model -> 404            Unavailable -> 503 + Retry-After
    DeadlineExceeded -> 504      anything unexpected -> 500 (logged with its traceback here only)

Invariant: the body is always {"error": {"message", "type", "param", "code"}} and the message one line
for a person; no traceback ever reaches a client.
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from trellis.core import log
from trellis.core.errors import DeadlineExceeded, InvalidRequest, Overloaded, TrellisError, Unavailable

RETRY_AFTER_S = 1  # what a shed client is told to wait before it tries again


class ApiError(Exception):
    """An HTTP-only refusal (the tree has no branch for it): auth, an unknown model or route."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


# (branch, status, type, code), most specific first.
_BRANCHES: tuple[tuple[type[TrellisError], int, str, str | None], ...] = (
    (InvalidRequest, 400, "invalid_request_error", None),
    (Overloaded, 429, "rate_limit_error", "overloaded"),
    (Unavailable, 503, "service_unavailable", "unavailable"),
    (DeadlineExceeded, 504, "timeout", "deadline_exceeded"),
)
_PARAM = re.compile(r"^(?:sampling\.)?([a-z_]+(?:\.[a-z_]+)*)\b")


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "error"


def client_message(error: TrellisError) -> str:
    """The message in the client's words: the router's `sampling.top_p` is OpenAI's `top_p`."""
    return one_line(str(error)).replace("sampling.", "")


def param_of(message: str, fields: frozenset[str]) -> str | None:
    """The request field a message starts with, if it names one."""
    m = _PARAM.match(message)
    return m.group(1) if m and m.group(1).split(".")[0] in fields else None


def error_json(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(error: Exception, fields: frozenset[str] = frozenset()) -> JSONResponse:
    """The response for anything a route raised."""
    if isinstance(error, ApiError):
        return error_json(error.status, error.message, error.type, code=error.code)
    if isinstance(error, ValidationError | RequestValidationError):
        return _validation(error)
    if isinstance(error, TrellisError):
        status, type_, code = next(
            ((s, t, c) for kind, s, t, c in _BRANCHES if isinstance(error, kind)),
            (400, "invalid_request_error", None),  # ConfigError and the rest: the request cannot be served
        )
        message = client_message(error)
        return error_json(status, message, type_, param=param_of(message, fields), code=code)
    log.get().exception("HTTP handler failed unexpectedly")
    return error_json(
        500, f"internal error: {type(error).__name__}: {one_line(str(error))}", "internal_error"
    )


def _validation(error: ValidationError | RequestValidationError) -> JSONResponse:
    """A body that does not validate: the first problem, naming its field (FastAPI's 422 becomes 400)."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # A union's branches show up as extra path parts ("str", "list[int]"): keep the field's own path.
    field = ".".join(p for p in loc if not re.search(r"[\[\]]|^(str|int|float|bool)$", p))
    if first.get("type") == "extra_forbidden":
        message = f"{field}: unsupported field"
    elif first.get("type") in ("json_invalid", "model_type", "model_attributes_type") and not field:
        message = "the request body must be a JSON object"
    else:
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid"))
    return error_json(400, one_line(message), "invalid_request_error", param=field or None)


def install(app: object, fields: frozenset[str]) -> None:
    """Route every error of the app (HTTPException 404/405 included) to the OpenAI shape."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc, fields)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_json(exc.status_code, str(exc.detail), "invalid_request_error")

    for kind in (ApiError, TrellisError, RequestValidationError, ValidationError, Exception):
        app.add_exception_handler(kind, on_error)  # type: ignore[attr-defined]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[attr-defined]
