"""OpenAI's Realtime API: `GET /v1/realtime?model=NAME`, a WebSocket of JSON events (hearth/realtime/session.py).

The model is a realtime pipeline (`pipeline:` in its YAML); `intent=transcription` makes a transcription session
(live captions of VAD-cut turns, no responses), on `gpt-realtime` when no model is named. The API key, when keys are set, is checked at the
handshake (middleware.py). Sessions are bounded: `realtime_max_sessions` at once, each closed after
`realtime_session_minutes`, or after `realtime_idle_seconds` without an event while no reply or turn is being
worked on; an event that is not JSON, or larger than `MAX_EVENT_BYTES`, gets an `error` event and the session
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from hearth.engine import Engine
from hearth.errors import HearthError
from hearth.realtime.session import Session, SessionGone

log = logging.getLogger("hearth.realtime")

DEFAULT_PIPELINE = "gpt-realtime"  # the default set's
MAX_EVENT_BYTES = 4 * 1024 * 1024  # an append of 30 s of pcm16 at 24 kHz, base64: about 2 MiB

router = APIRouter()


class _Slots:
    """How many realtime sessions are open (one event loop: no lock needed)."""

    open = 0


async def _refuse(websocket: WebSocket, message: str, code: str, close_code: int) -> None:
    await websocket.send_json({"type": "error", "event_id": "event_refused",
                               "error": {"type": "invalid_request_error", "code": code, "message": message,
                                         "param": None, "event_id": None}})
    await websocket.close(close_code, message[:120])


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    engine: Engine = websocket.app.state.engine
    settings = engine.settings
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    intent = websocket.query_params.get("intent", "")
    if intent not in ("", "conversation", "transcription"):
        await _refuse(websocket, f"intent must be 'transcription' or left out; got {intent!r}", "invalid_intent", 1008)
        return
    kind = "transcription" if intent == "transcription" else "realtime"
    # Live captions may leave the model out (as OpenAI's transcription sessions do): the default pipeline's parts.
    name = websocket.query_params.get("model", "") or (DEFAULT_PIPELINE if kind == "transcription" else "")
    try:
        if not name:
            raise HearthError("the 'model' query parameter is required: a realtime pipeline model")
        config = engine.model(name)
        if config.pipeline is None:
            raise HearthError(f"model '{config.name}' is not a realtime model: its YAML has no 'pipeline'")
    except HearthError as exc:
        await _refuse(websocket, exc.message, "model_not_found" if name else "missing_model", 1008)
        return
    if _Slots.open >= settings.realtime_max_sessions:
        await _refuse(websocket, f"too many realtime sessions ({settings.realtime_max_sessions}); try again later",
                      "session_limit", 1013)
        return
    _Slots.open += 1
    session = Session(engine, config, websocket.send_json, kind)
    ends = time.monotonic() + settings.realtime_session_minutes * 60
    try:
        await session.start()
        while True:
            wait = min(settings.realtime_idle_seconds, ends - time.monotonic())
            if wait <= 0:
                await _refuse(websocket, "the session reached its time limit", "session_expired", 1000)
                return
            try:
                message = await asyncio.wait_for(websocket.receive(), wait)
            except TimeoutError:
                if session.busy() and time.monotonic() < ends:
                    continue
                reason = "idle" if time.monotonic() < ends else "expired"
                await _refuse(websocket, f"the session was closed: {reason}", f"session_{reason}", 1000)
                return
            if message["type"] == "websocket.disconnect":
                return
            event = _event(message.get("text"), message.get("bytes"))
            if event is None:
                await _bad(session, message)
            else:
                await session.handle(event)
    except (WebSocketDisconnect, SessionGone):
        pass
    finally:
        _Slots.open -= 1
        await session.close()
        with contextlib.suppress(Exception):
            await websocket.close()


def _event(text: str | None, data: bytes | None) -> Any:
    raw = text if text is not None else (data or b"").decode("utf-8", "replace")
    if len(raw) > MAX_EVENT_BYTES:
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


async def _bad(session: Session, message: dict[str, Any]) -> None:
    """An event that is not a JSON object, or too large: said in an error event, and the session goes on."""
    size = len(message.get("text") or message.get("bytes") or "")
    await session.error(f"an event is at most {MAX_EVENT_BYTES} bytes" if size > MAX_EVENT_BYTES else
                        "each event must be a JSON object", code="invalid_event")
