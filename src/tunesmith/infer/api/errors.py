"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Request problems are 4xx with a message naming the field; an unexpected exception is a 500 with the same
shape (logged with its traceback) and the server keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")

_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "server_error",
}


class ApiError(TunesmithError):
    """A request the server refuses, with its HTTP status and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object of one failure."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line per pydantic error ('messages.0.role: Input should be ...; got 'robot'') and
    the first offending field."""
    lines, first = [], None
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        first = first or where or None
        if e.get("type") == "json_invalid":
            lines.append(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
            continue
        if e.get("type") == "extra_forbidden":
            lines.append(f"{where}: unrecognized request argument")
            continue
        got = f"; got {e['input']!r}" if "input" in e and e.get("type") != "missing" else ""
        lines.append(f"{where or 'body'}: {e['msg']}{got}"[:300])
    return "; ".join(lines) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    """Every error path answers with the OpenAI error object; no handler lets a 500 take the server down."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(TunesmithError)
    async def _user(request: Request, exc: TunesmithError) -> JSONResponse:
        return error_response(400, str(exc), None, "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(
            500, f"internal server error: {type(exc).__name__}: {exc}", None, "internal_error"
        )


__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers", "validation_message"]
