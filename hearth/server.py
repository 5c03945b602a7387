"""The HTTP server: uvicorn, with read timeouts and Hearth's drain on SIGTERM.

uvicorn times out idle keep-alive connections but not a client that sends its request slowly: a connection that
trickles its headers, or stops halfway through its body, is held open forever (110 such connections stayed open
for a minute in issue 26's probe). Neither uvicorn nor Starlette has a setting for it, so its HTTP protocol is
extended here: the headers must arrive within `header_timeout_seconds` of the request's first byte (or of the
connection opening), and the body may pause no longer than `body_timeout_seconds` between pieces; otherwise the
client gets 408 and the connection is closed. Streaming is untouched: the timers run only while a request is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hearth.api.drain import DRAIN
from hearth.settings import Settings


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def timed_protocol(header_timeout: float, body_timeout: float) -> type[HttpToolsProtocol]:
    class TimedProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a deadline for reading each request."""

        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            if seconds > 0:
                self._read_timer = self.loop.call_later(seconds, self._expire, what)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _expire(self, what: str) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            answered = self.cycle is not None and self.cycle.response_started
            if not answered:
                self.transport.write(_timeout_response(f"the request's {what} did not arrive in time"))
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout, "headers")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout, "headers")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_timeout, "body")

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            self._arm(body_timeout, "body")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedProtocol


class Server(uvicorn.Server):
    """On SIGTERM, Hearth's drain starts first (503 for new requests, a grace for running ones, then their protocol's
    error); uvicorn's own wait is longer, so the drain ends them before uvicorn would cut them."""

    def __init__(self, config: uvicorn.Config, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not DRAIN.begun:
            with contextlib.suppress(RuntimeError):  # (no loop yet: nothing is running to drain)
                asyncio.get_event_loop().call_soon_threadsafe(DRAIN.begin, self.grace)
        super().handle_exit(sig, frame)


def run(app: Any, settings: Settings) -> None:
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        http=timed_protocol(settings.header_timeout_seconds, settings.body_timeout_seconds),
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5)
    Server(config, settings.shutdown_grace_seconds).run()
