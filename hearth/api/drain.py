"""Shutting down without cutting anyone off (SIGTERM): new requests get 503 with Retry-After at once; running
requests and streams get a grace period; when it ends, a request that has not begun its answer gets a 503, and a
stream that has is ended with its protocol's error event and end (`primed` in streaming.py races each event against
the end of the grace). Then the server stops its runners as it always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth.errors import ServiceUnavailable

log = logging.getLogger("hearth.api")
T = TypeVar("T")
RETRY_AFTER = "5"


class Drain:
    """The process's shutdown state: begun (no new work) and, after the grace, expired (end what is left)."""

    def __init__(self) -> None:
        self.begun = False
        self._expired: asyncio.Future[None] | None = None

    def expired(self) -> asyncio.Future[None]:
        if self._expired is None:
            self._expired = asyncio.get_running_loop().create_future()
        return self._expired

    def begin(self, grace: float) -> None:
        """Called on the event loop when the server is told to stop."""
        if self.begun:
            return
        self.begun = True
        log.info("shutting down: new requests get 503; running ones have %g s to finish", grace)
        expired = self.expired()
        asyncio.get_running_loop().call_later(grace, lambda: expired.done() or expired.set_result(None))

    async def until_expired(self, work: Awaitable[T]) -> T:
        """`work`, unless the grace ends first: then it is cancelled and the caller gets a 503."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, self.expired()}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ServiceUnavailable("the server is shutting down; this stream was ended after the grace period",
                                 headers={"Retry-After": RETRY_AFTER})


DRAIN = Drain()


class DrainMiddleware:
    """503 for requests arriving once shutdown has begun; 503 for those still without an answer when it ends."""

    def __init__(self, app: ASGIApp, drain: Drain = DRAIN) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from hearth.api.middleware import send_error

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.begun:
            await send_error(send, scope, 503, "the server is shutting down; retry shortly",
                             headers={"Retry-After": RETRY_AFTER}, code="shutting_down")
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task: asyncio.Task[Any] = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        try:
            await asyncio.wait({task, self.drain.expired()}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done() or started:
            await task  # finished, or a stream that ends itself with its protocol's error event
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if not started:
            await send_error(send, scope, 503, "the server is shutting down; the request was not answered in "
                             "time, retry shortly", headers={"Retry-After": RETRY_AFTER}, code="shutting_down")
