"""ASGI middleware: API keys on every route but health, a request body size limit, and request metrics."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.api.errors import error_body, shape_for
from hearth.metrics import Metrics

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                     scope: Scope | None = None) -> None:
    """An OpenAI-shaped error, sent in the shape of the API the path belongs to (its registered encoder)."""
    if scope is not None and "app" in scope:
        body = shape_for(scope["app"], scope["path"], status, body["error"]["message"]) or body
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, scope: Scope, status: int, message: str, *, headers: dict[str, str] | None = None,
                     code: str | None = None) -> None:
    """An error answered by middleware, in the shape of the route's API."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    await _send_json(send, status, error_body(message, type=kind, code=code), headers, scope=scope)


def _presented_key(scope: Scope) -> str | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    if scope["type"] == "websocket":  # a browser cannot set headers: OpenAI's subprotocol carries the key
        for protocol in scope.get("subprotocols", []):
            if protocol.startswith(INSECURE_KEY_PROTOCOL):
                return protocol[len(INSECURE_KEY_PROTOCOL):]
    return None


INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."


class ApiKeyMiddleware:
    """When keys are configured, every HTTP route but /healthz and /readyz needs one of them, and so does the
    WebSocket handshake of /v1/realtime (also as OpenAI's `openai-insecure-api-key.KEY` subprotocol)."""

    def __init__(self, app: ASGIApp, keys: list[str], open_prefixes: tuple[str, ...] = (),
                 open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys if key]
        # The web page's static files: they hold no data, and a browser cannot send a key when it opens a page.
        self.open_paths = OPEN_PATHS | set(open_paths)
        self.open_prefixes = open_prefixes

    def _valid(self, presented: str) -> bool:
        candidate = presented.encode()
        matched = False
        for key in self.keys:  # compare against every key, so timing does not reveal which one is close
            matched |= hmac.compare_digest(candidate, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys or scope["path"] in self.open_paths or \
                scope["path"].startswith(self.open_prefixes):
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if presented is None:
            message = "missing API key: send it as 'Authorization: Bearer KEY' or in the 'x-api-key' header"
        elif not self._valid(presented):
            message = "invalid API key"
        else:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # refused at the handshake: the server answers 403, nothing is accepted
            await send({"type": "websocket.close", "code": 1008, "reason": message})
            return
        await _send_json(send, 401, error_body(message, type="authentication_error", code="invalid_api_key"),
                         {"WWW-Authenticate": "Bearer"}, scope=scope)


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> dict[str, Any]:
        return error_body(f"the request body is larger than the server's limit of {self.limit} bytes",
                          type="invalid_request_error", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await _send_json(send, 413, self._too_large(), scope=scope)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(413, self._too_large()["error"]["message"])
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._too_large(), scope=scope)


class _BodyTooLarge(HTTPException):
    """An HTTPException, so the framework's body parser passes it on instead of calling it a parse error."""


class OllamaJsonMiddleware:
    """Ollama's server reads every /api/ body as JSON whatever its Content-Type, and its documented examples
    (`curl http://localhost:11434/api/chat -d '{...}'`) send curl's form type: such bodies are read as JSON here too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            given = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            if not given or given.split(b";")[0].strip().lower() in (b"application/x-www-form-urlencoded",
                                                                        b"text/plain"):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts every HTTP request by method, route and status, and times it to the end of its response body. The
    route is the path template the request matched (`/v1/models/{model_id}`), so the labels stay few whatever
    paths clients send. A request that reached no route (refused for its API key or its size, or a path that
    does not exist) counts as `unrouted`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before it starts a response

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unrouted"
            method = scope.get("method", "")
            # Labels stay few whatever methods clients make up (httptools refuses unknown methods before the app
            # sees them; h11, uvicorn's other parser, lets any token through).
            if method not in METHODS:
                method = "other"
            self.metrics.inc("hearth_http_requests_total", method=method, route=route, status=str(status))
            self.metrics.observe("hearth_http_request_duration_seconds", time.perf_counter() - started,
                                 method=method, route=route)
