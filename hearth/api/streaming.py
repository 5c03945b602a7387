"""Server-Sent Events, and stopping work when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from hearth.api.drain import DRAIN
from hearth.api.errors import error_body
from hearth.errors import HearthError, ServiceUnavailable

log = logging.getLogger("hearth.api")
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def primed(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Start `events` now, so errors before the first event become an ordinary error response."""
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise

    async def rest() -> AsyncIterator[T]:
        async with contextlib.aclosing(events):
            yield first
            while True:  # each event races the end of a shutdown's grace period (then: a 503 error event)
                try:
                    event = await DRAIN.until_expired(anext(events))
                except StopAsyncIteration:
                    return
                yield event

    return rest()


def sse_response(
    events: AsyncIterator[dict[str, Any]],
    *,
    error_event: Callable[[HearthError], dict[str, Any]] | None = None,
    done: bytes | None = b"data: [DONE]\n\n",
) -> StreamingResponse:
    """Stream `events` as SSE; an error after the stream began is sent as an error event, then [DONE]."""

    def as_error(exc: HearthError) -> dict[str, Any]:
        if error_event is not None:
            return error_event(exc)
        return error_body(exc.message, type=exc.type, param=exc.param, code=exc.code)

    async def body() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield sse_event(event)
        except HearthError as exc:
            yield sse_event(as_error(exc))
        except Exception:
            log.exception("stream failed")
            yield sse_event(as_error(ServiceUnavailable("internal error while streaming; see the server log")))
        if done:
            yield done

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (so generation stops)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if not task.done():
        task.cancel()
        log.info("client disconnected from %s; stopped its request", request.url.path)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ServiceUnavailable("the client disconnected")
    watcher.cancel()
    return task.result()
