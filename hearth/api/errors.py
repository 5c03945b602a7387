"""Every error response is made here, in the client's protocol (OpenAI's shape on /v1)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hearth.errors import HearthError

log = logging.getLogger("hearth.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = type or _TYPES.get(status, "server_error")
    return JSONResponse(error_body(message, type=kind, param=param, code=code), status_code=status,
                        headers=headers)


def from_hearth_error(exc: HearthError) -> JSONResponse:
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers)


def _param_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems = exc.errors()
    if not problems:
        return "the request body is invalid", None
    first = problems[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    loc = tuple(first.get("loc") or ())
    if loc == ("body",) and first.get("type") == "missing":
        return "the request needs a JSON body", None
    if loc == ("body",):
        return f"the request body must be a JSON object: {first.get('msg')}", None
    param = _param_path(loc)
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    shown = first.get("input")
    detail = ""
    if shown is not None and not isinstance(shown, dict | list):
        detail = f" (got {json.dumps(shown)[:80]})"
    return f"invalid value for '{param}': {message}{detail}", param


ErrorShape = Callable[[int, str], dict[str, Any]]


def shape_for(app: Any, path: str, status: int, message: str) -> dict[str, Any] | None:
    """The error body in the shape of the API that owns `path` (each API registers its encoder with
    `install_error_handlers`); None for OpenAI's, which the caller makes with its param and code."""
    for prefix, shape in getattr(app.state, "error_shapes", ()):
        if path.startswith(prefix):
            return shape(status, message)
    return None


def shaped(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse | None:
    body = shape_for(request.app, request.url.path, status, message)
    return JSONResponse(body, status_code=status, headers=headers) if body is not None else None


def install_error_handlers(app: FastAPI, shapes: dict[str, ErrorShape] | None = None) -> None:
    """Map errors to responses; `shapes` gives the error encoder of each API that is not OpenAI's, by the prefix of
    its routes."""
    app.state.error_shapes = tuple((shapes or {}).items())

    @app.exception_handler(HearthError)
    async def _hearth(request: Request, exc: HearthError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return shaped(request, exc.status, exc.message, exc.headers) or from_hearth_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        other = shaped(request, 400, message)
        if other is not None:
            return other
        return error_response(400, message, param=param, code="invalid_value" if param else "invalid_json")

    @app.exception_handler(ValidationError)
    async def _adapted(request: Request, exc: ValidationError) -> JSONResponse:
        """An adapter (Ollama, Anthropic, Responses) built an internal request from what the client sent, and the
        client's values did not fit: that is the client's 400, not a server error."""
        first = exc.errors()[0]
        where = _param_path(tuple(first.get("loc", ())))
        message = f"invalid value for '{where}': {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
        return shaped(request, 400, message) or error_response(400, message, param=where or None,
                                                                 code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None
        other = shaped(request, exc.status_code, message)
        if other is not None:
            return other
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              code="internal_error")
