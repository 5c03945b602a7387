"""One Realtime API session: its settings, its conversation, the user's audio buffer and the response in progress.

Client events come in as dicts (`handle`); server events go out through `send`, one at a time. The user's audio is
kept as pcm16 at its format's rate (formats.py); the models see it as a WAV file, which their runners decode.
With server VAD the buffer is read by the pipeline's VAD model every `VAD_EVERY_MS` of new audio: speech that begins
starts a turn (and interrupts a reply being given), a short silence has whisper start hearing it (a guess, dropped if
speech goes on), speech followed by `silence_duration_ms` of silence ends it, and the turn is committed, transcribed
and answered. A transcription session stops there. An answer's text goes to the voice while it is still being
written (speaker.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import secrets
import wave
from collections.abc import Awaitable, Callable
from typing import Any

from hearth.chat.request import ChatRequest, Finished, TextDelta, ToolArgumentsDelta, ToolCallStarted
from hearth.chat.serving import chat_events
from hearth.config.schema import ModelConfig
from hearth.engine import Engine
from hearth.errors import HearthError
from hearth.realtime.formats import FORMATS, PCM, AudioFormat
from hearth.realtime.speaker import Speaker
from hearth.runner import hearth_pb2 as pb

log = logging.getLogger("hearth.realtime")

RATE = 24_000  # OpenAI's audio/pcm
VAD_EVERY_MS = 100  # server VAD reads the buffer again after this much new audio
# After this much silence server VAD has whisper hear the turn, while it waits out the rest of silence_duration_ms:
# when the turn does end there, its transcript is ready (or nearly); when speech goes on, the guess is dropped.
GUESS_AFTER_MS = 100
KEEP_BEFORE_SPEECH_MS = 1_000  # with no speech in the buffer, older audio than this is dropped
MAX_BUFFER_SECONDS = 15 * 60  # a turn longer than this is refused (the buffer is bounded)

# What OpenAI's clients name in audio.input.transcription.model: here they mean the pipeline's transcription model
# (a session may name any installed model that transcribes instead).
OPENAI_TRANSCRIBERS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-latest",
                       "gpt-4o-transcribe-diarize")

Send = Callable[[dict[str, Any]], Awaitable[None]]


class SessionGone(Exception):
    """The client went away: whatever was under way for it stops, quietly."""


class ClientError(Exception):
    """A client event that cannot be carried out: answered with an `error` event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def wav(pcm: bytes, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return out.getvalue()


def ms(pcm_bytes: int, rate: int = RATE) -> int:
    return pcm_bytes * 1000 // (2 * rate)


class Session:
    def __init__(self, engine: Engine, config: ModelConfig, send: Send, kind: str = "realtime") -> None:
        assert config.pipeline is not None
        self.engine, self.config, self.pipeline = engine, config, config.pipeline
        self.kind = kind  # "realtime": a conversation; "transcription": live captions, no responses
        self._send = send
        self._sending = asyncio.Lock()
        self.gone = False
        self.id = new_id("sess")
        self.instructions = ""
        self.voice = "alloy"
        self.input_format = self.output_format = PCM
        self.modalities = ["audio"]
        self.tools: list[dict[str, Any]] = []
        self.tool_choice: Any = "auto"
        self.temperature: float | None = None
        self.max_output_tokens: int | None = None
        self.input_transcription: dict[str, Any] | None = None
        self.turn_detection: dict[str, Any] | None = {
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
            "create_response": True, "interrupt_response": True} if self.pipeline.vad else None
        self.items: list[dict[str, Any]] = []
        self.buffer = bytearray()
        self.buffer_start_ms = 0  # where the buffer starts in the session's input audio
        self.checked_bytes = 0  # how much of the buffer server VAD has read
        self.speech_item: str | None = None  # the item id of the turn being spoken, once speech started
        self.response: asyncio.Task[None] | None = None
        self.vad_task: asyncio.Task[None] | None = None
        # whisper hearing the turn ahead of its commit: ((speech start, speech end) in session ms, the task)
        self.guess: tuple[tuple[int, int], asyncio.Task[str]] | None = None
        # Per assistant item: (sentence, where its audio begins in ms), what a truncation keeps.
        self.spoken: dict[str, list[tuple[str, int]]] = {}

    # -- out -----------------------------------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        async with self._sending:
            if self.gone:
                raise SessionGone
            try:
                await self._send({"event_id": new_id("event"), **event})
            except Exception as exc:  # the socket closed under us (starlette's WebSocketDisconnect, or a RuntimeError)
                self.gone = True
                raise SessionGone from exc

    async def error(self, message: str, code: str = "invalid_request_error", param: str | None = None,
                    event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message,
                                                    "param": param, "event_id": event_id}})

    def describe(self) -> dict[str, Any]:
        if self.kind == "transcription":
            return {"type": "transcription", "object": "realtime.transcription_session", "id": self.id,
                    "audio": {"input": {"format": self.input_format.describe(),
                                        "transcription": self.input_transcription or
                                        {"model": self.transcriber()},
                                        "turn_detection": self.turn_detection, "noise_reduction": None}},
                    "include": []}
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.config.name,
            "output_modalities": self.modalities, "instructions": self.instructions,
            "audio": {
                "input": {"format": self.input_format.describe(), "transcription": self.input_transcription,
                          "turn_detection": self.turn_detection, "noise_reduction": None},
                "output": {"format": self.output_format.describe(), "voice": self.voice, "speed": 1.0},
            },
            "tools": self.tools, "tool_choice": self.tool_choice,
            "max_output_tokens": self.max_output_tokens or "inf",
        }

    async def start(self) -> None:
        await self.send({"type": "session.created", "session": self.describe()})

    def busy(self) -> bool:
        """A reply or a turn is still being worked on: the session is not idle, whatever the client sends."""
        return any(task is not None and not task.done() for task in (self.response, self.vad_task))

    async def close(self) -> None:
        self._drop_guess()
        for task in (self.response, self.vad_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- in ------------------------------------------------------------------------------------------------------

    async def handle(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("each event must be a JSON object with a 'type'", param="type")
            return
        handler = HANDLERS.get(event["type"])
        if handler is None:
            await self.error(f"unknown event type '{event['type']}'", code="invalid_event", param="type",
                             event_id=event.get("event_id"))
            return
        try:
            await handler(self, event)
        except SessionGone:
            raise
        except ClientError as exc:
            await self.error(exc.message, exc.code, exc.param, event.get("event_id"))
        except HearthError as exc:
            await self.error(exc.message, exc.code, exc.param, event.get("event_id"))
        except Exception:  # a mistake of ours: said, logged, and the session goes on
            log.exception("realtime event %s failed", event["type"])
            await self.error(f"the server could not carry out {event['type']}", code="server_error",
                             event_id=event.get("event_id"))

    async def session_update(self, event: dict[str, Any], reply: str = "session.updated") -> None:
        """Every field is checked before any is changed: a bad update changes nothing."""
        session = _mapping(event.get("session", {}), "session")
        changes: dict[str, Any] = {}
        if session.get("type") is not None:
            if session["type"] not in ("realtime", "transcription"):
                raise ClientError("session.type must be 'realtime' or 'transcription'", param="session.type")
            changes["kind"] = session["type"]
        if "instructions" in session:
            changes["instructions"] = _string(session["instructions"], "session.instructions")
        if "output_modalities" in session or "modalities" in session:
            changes["modalities"] = _modalities(session.get("output_modalities", session.get("modalities")),
                                                "session.output_modalities")
        audio = _mapping(session.get("audio", {}), "session.audio")
        given_input = _mapping(audio.get("input", {}), "session.audio.input")
        given_output = _mapping(audio.get("output", {}), "session.audio.output")
        given_format = given_input.get("format", session.get("input_audio_format"))
        if given_format is not None:
            chosen = _audio_format(given_format, "session.audio.input.format")
            if chosen != self.input_format and self.buffer:
                raise ClientError("the input audio buffer holds audio in the old format: clear or commit it first",
                                  param="session.audio.input.format")
            changes["input_format"] = chosen
        given_format = given_output.get("format", session.get("output_audio_format"))
        if given_format is not None:
            changes["output_format"] = _audio_format(given_format, "session.audio.output.format")
        voice = given_output.get("voice", session.get("voice"))
        if voice is not None:
            changes["voice"] = _string(voice, "session.audio.output.voice")
        transcription = given_input.get("transcription", session.get("input_audio_transcription", ...))
        if transcription is not ...:
            changes["input_transcription"] = None if transcription is None else self._transcription(transcription)
        detection = given_input.get("turn_detection", session.get("turn_detection", ...))
        if detection is not ...:
            changes["turn_detection"] = self._turn_detection(detection)
        if "tools" in session:
            changes["tools"] = _tools(session["tools"])
        if "tool_choice" in session:
            changes["tool_choice"] = _tool_choice(session["tool_choice"], "session.tool_choice")
        if "temperature" in session:
            changes["temperature"] = _number(session["temperature"], "session.temperature", 0, 2)
        limit = session.get("max_output_tokens", session.get("max_response_output_tokens", ...))
        if limit is not ...:
            changes["max_output_tokens"] = None if limit in ("inf", None) else \
                int(_number(limit, "session.max_output_tokens", 1, 2**31 - 1))
        for name, value in changes.items():
            setattr(self, name, value)
        await self.send({"type": reply, "session": self.describe()})

    async def transcription_session_update(self, event: dict[str, Any]) -> None:
        """The beta's event for transcription sessions: the same fields, answered in its own name."""
        session = _mapping(event.get("session", {}), "session")
        await self.session_update({"session": {**session, "type": "transcription"}}, "transcription_session.updated")

    def _transcription(self, value: Any) -> dict[str, Any]:
        """`audio.input.transcription`: `model` (any model that transcribes), `language`, `prompt`."""
        given = _mapping(value, "session.audio.input.transcription")
        chosen = {key: _string(given[key], f"session.audio.input.transcription.{key}")
                  for key in ("model", "language", "prompt") if given.get(key) is not None}
        if chosen.get("model") in OPENAI_TRANSCRIBERS:  # OpenAI's own: the pipeline's model stands for them
            chosen.pop("model")
        if "model" in chosen:
            try:
                config = self.engine.model(chosen["model"])
            except HearthError as exc:
                raise ClientError(exc.message, param="session.audio.input.transcription.model") from None
            if "transcript" not in config.usecases:
                raise ClientError(f"model '{chosen['model']}' does not transcribe audio",
                                  param="session.audio.input.transcription.model")
        return chosen

    def _turn_detection(self, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        given = _mapping(value, "session.audio.input.turn_detection")
        if given.get("type", "server_vad") != "server_vad":
            raise ClientError("turn_detection type must be 'server_vad' (or turn_detection null)",
                              param="session.audio.input.turn_detection.type")
        if not self.pipeline.vad:
            raise ClientError(f"model '{self.config.name}' names no 'pipeline.vad' model: server VAD is not "
                              "available", param="session.audio.input.turn_detection")
        current = self.turn_detection or {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                          "silence_duration_ms": 500, "create_response": True,
                                          "interrupt_response": True}
        merged = {**current, **{k: v for k, v in given.items() if v is not None}}
        _number(merged["threshold"], "turn_detection.threshold", 0.01, 0.99)
        _number(merged["prefix_padding_ms"], "turn_detection.prefix_padding_ms", 0, 10_000)
        _number(merged["silence_duration_ms"], "turn_detection.silence_duration_ms", 50, 10_000)
        return merged

    async def buffer_append(self, event: dict[str, Any]) -> None:
        try:
            pcm = base64.b64decode(_string(event.get("audio"), "audio"), validate=True)
        except binascii.Error:
            raise ClientError("audio must be base64-encoded pcm16", param="audio") from None
        if len(pcm) % 2:
            raise ClientError("audio must hold whole 16-bit samples", param="audio")
        pcm = self.input_format.to_pcm16(pcm)
        if len(self.buffer) + len(pcm) > self._bytes(MAX_BUFFER_SECONDS * 1000):
            raise ClientError(f"the input audio buffer is full ({MAX_BUFFER_SECONDS} s): commit or clear it",
                              code="input_audio_buffer_full")
        self.buffer += pcm
        if self.turn_detection and self._unread() and (self.vad_task is None or self.vad_task.done()):
            self.vad_task = asyncio.create_task(self._detect_while_unread())

    def _unread(self) -> bool:
        return len(self.buffer) - self.checked_bytes >= self._bytes(VAD_EVERY_MS)

    def _bytes(self, milliseconds: int) -> int:
        """How many bytes of the buffer (pcm16 at the input format's rate) hold this long."""
        return milliseconds * self.input_format.rate // 1000 * 2

    async def _detect_while_unread(self) -> None:
        """Server VAD reads the buffer again as long as enough new audio came while it read."""
        with contextlib.suppress(SessionGone):
            while self.turn_detection and self._unread():
                await self._detect()

    async def buffer_commit(self, event: dict[str, Any]) -> None:
        if len(self.buffer) < self._bytes(100):
            raise ClientError("the input audio buffer holds less than 100 ms of audio",
                              code="input_audio_buffer_commit_empty")
        await self._commit(self.speech_item or new_id("item"))

    async def buffer_clear(self, event: dict[str, Any]) -> None:
        self._drop_guess()
        self._drop(len(self.buffer))
        self.speech_item = None
        await self.send({"type": "input_audio_buffer.cleared"})

    def _drop(self, count: int) -> bytes:
        dropped = bytes(self.buffer[:count])
        del self.buffer[:count]
        self.buffer_start_ms += ms(count, self.input_format.rate)
        self.checked_bytes = max(0, self.checked_bytes - count)
        return dropped

    async def _detect(self) -> None:
        """Server VAD over the buffer: a turn starts, or ends and is committed and answered."""
        detection = self.turn_detection
        if not detection or not self.pipeline.vad:
            return
        checked = len(self.buffer)
        try:
            segments = await self._vad(bytes(self.buffer[:checked]), detection)
        except HearthError as exc:
            await self.error(f"voice activity detection failed: {exc.message}", code="vad_failed")
            self.checked_bytes = checked
            return
        self.checked_bytes = checked
        duration_ms = ms(checked, self.input_format.rate)
        if not segments:
            if self.speech_item is None:  # nothing said: keep only the recent audio
                excess = checked - self._bytes(KEEP_BEFORE_SPEECH_MS + int(detection["prefix_padding_ms"]))
                if excess > 0:
                    self._drop(excess - excess % 2)
            return
        spans = [(int(s.start * 1000), int(s.end * 1000)) for s in segments]
        needed = int(detection["silence_duration_ms"])

        def silence_after(i: int) -> int:
            """The silence after span i: up to the next span, or to the buffer's end once the span has closed."""
            end = spans[i][1]
            return (spans[i + 1][0] if i + 1 < len(spans) else duration_ms if end < duration_ms - 20 else end) - end

        # The turn is the spans up to the first silence of silence_duration_ms (audio sent faster than real time
        # may hold several turns).
        last = next((i for i in range(len(spans)) if silence_after(i) >= needed), len(spans) - 1)
        start_ms, end_ms = spans[0][0], spans[last][1]
        if self.speech_item is None:
            self.speech_item = new_id("item")
            await self.send({"type": "input_audio_buffer.speech_started", "item_id": self.speech_item,
                             "audio_start_ms": self.buffer_start_ms + start_ms})
            if detection.get("interrupt_response", True) and self.response is not None and not self.response.done():
                self.response.cancel()
        silence = silence_after(last)
        keep_from = max(0, start_ms - int(detection["prefix_padding_ms"]))
        turn = (self.buffer_start_ms + start_ms, self.buffer_start_ms + end_ms)
        if silence >= needed:
            item = self.speech_item
            await self.send({"type": "input_audio_buffer.speech_stopped", "item_id": item,
                             "audio_end_ms": self.buffer_start_ms + end_ms})
            upto = self._bytes(min(end_ms + needed, duration_ms)) - self._bytes(keep_from)
            self._drop(self._bytes(keep_from))
            await self._commit(item, respond=bool(detection.get("create_response", True)), turn=turn, upto=upto)
        elif silence >= GUESS_AFTER_MS and self.transcriber() and (self.guess is None or self.guess[0] != turn):
            self._drop_guess()
            pcm = bytes(self.buffer[self._bytes(keep_from):checked])
            task = asyncio.create_task(self._hear(pcm))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # a dropped guess's error
            self.guess = (turn, task)

    def _drop_guess(self) -> None:
        if self.guess is not None:
            self.guess[1].cancel()
            self.guess = None

    async def _vad(self, pcm: bytes, detection: dict[str, Any]) -> list[Any]:
        config = self.engine.model(self.pipeline.vad or "")
        # Segments close after a short silence, so the guess can start; the turn ends at silence_duration_ms.
        silence = min(GUESS_AFTER_MS, int(detection["silence_duration_ms"]))
        request = pb.VadRequest(audio=wav(pcm, self.input_format.rate), threshold=float(detection["threshold"]),
                                min_silence_ms=silence, speech_pad_ms=0)
        async with self.engine.runner(config, "vad") as runner:
            reply = await runner.call("detect_speech", request)
        return list(reply.segments)

    async def _commit(self, item_id: str, respond: bool = False, turn: tuple[int, int] | None = None,
                      upto: int | None = None) -> None:
        """The buffer (or its first `upto` bytes: the rest is read again) becomes a user item, heard by whisper
        (through the guess when it heard this very turn)."""
        guess = self.guess[1] if self.guess is not None and self.guess[0] == turn else None
        if guess is None:
            self._drop_guess()
        self.guess = None
        pcm = self._drop(len(self.buffer) if upto is None else upto)
        self.checked_bytes = 0
        self.speech_item = None
        previous = self.items[-1]["id"] if self.items else None
        item = {"id": item_id, "type": "message", "object": "realtime.item", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        self.items.append(item)
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": previous, "item_id": item_id})
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        transcript = await self._transcribe(item_id, pcm, guess)
        item["content"][0]["transcript"] = transcript
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
        if respond and transcript is not None and self.kind == "realtime" and self.pipeline.llm:
            await self._start_response({})

    def transcriber(self) -> str | None:
        """The model that hears the turns: the session's choice, else the pipeline's."""
        return (self.input_transcription or {}).get("model") or self.pipeline.transcription

    async def _hear(self, pcm: bytes) -> str:
        """What whisper (the session's transcription model) hears in `pcm` (HearthError when it cannot)."""
        pieces: list[str] = []
        chosen = self.input_transcription or {}
        config = self.engine.model(self.transcriber() or "")
        async with self.engine.runner(config, "transcribe") as runner:
            request = pb.TranscribeRequest(audio=wav(pcm, self.input_format.rate), filename="turn.wav",
                                           language=chosen.get("language", ""), prompt=chosen.get("prompt", ""))
            async for reply in runner.stream("transcribe", request):
                if reply.HasField("segment") and reply.segment.text:
                    pieces.append(reply.segment.text)
        return "".join(pieces).strip()

    async def _transcribe(self, item_id: str, pcm: bytes, guess: asyncio.Task[str] | None = None) -> str | None:
        if not self.transcriber():
            return None
        try:
            transcript = await (guess if guess is not None else self._hear(pcm))
        except HearthError as exc:
            await self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item_id,
                             "content_index": 0, "error": {"type": "transcription_error", "message": exc.message}})
            return None
        if transcript:  # whisper's segments come at once for a turn: one delta (as OpenAI's whisper-1 sends)
            await self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
                             "content_index": 0, "delta": transcript})
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                         "content_index": 0, "transcript": transcript,
                         "usage": {"type": "duration",
                                   "seconds": round(len(pcm) / (2 * self.input_format.rate), 3)}})
        return transcript

    # -- conversation --------------------------------------------------------------------------------------------

    async def item_create(self, event: dict[str, Any]) -> None:
        item = dict(_mapping(event.get("item"), "item"))
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system"):
                raise ClientError("a message item's role must be user, assistant or system", param="item.role")
            content = item.get("content")
            if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
                raise ClientError("a message item's content must be a list of parts", param="item.content")
            for part in content:
                if part.get("type") in ("input_audio", "audio"):
                    raise ClientError("audio content is sent through input_audio_buffer.append",
                                      param="item.content")
                if part.get("type") not in ("input_text", "text", "output_text"):
                    raise ClientError(f"content part type '{part.get('type')}' is not supported",
                                      param="item.content")
                _string(part.get("text"), "item.content.text")
        elif kind == "function_call_output":
            _string(item.get("call_id"), "item.call_id")
            _string(item.get("output"), "item.output")
        elif kind == "function_call":
            _string(item.get("call_id"), "item.call_id")
            _string(item.get("name"), "item.name")
            _string(item.get("arguments", ""), "item.arguments")
        else:
            raise ClientError(f"item type '{kind}' is not supported", param="item.type")
        item["id"] = _string(item.get("id") or new_id("item"), "item.id")
        if any(existing["id"] == item["id"] for existing in self.items):
            raise ClientError(f"an item with id '{item['id']}' already exists", param="item.id")
        item.update(type=kind, object="realtime.item", status="completed")
        previous = event.get("previous_item_id")
        index = len(self.items) if previous is None else self._index(previous, "previous_item_id") + 1
        after = self.items[index - 1]["id"] if index else None
        self.items.insert(index, item)
        await self.send({"type": "conversation.item.added", "previous_item_id": after, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": after, "item": item})

    def _index(self, item_id: Any, param: str) -> int:
        for index, item in enumerate(self.items):
            if item["id"] == item_id:
                return index
        raise ClientError(f"no item with id '{item_id}'", code="item_not_found", param=param)

    async def item_delete(self, event: dict[str, Any]) -> None:
        del self.items[self._index(event.get("item_id"), "item_id")]
        self.spoken.pop(event["item_id"], None)
        await self.send({"type": "conversation.item.deleted", "item_id": event["item_id"]})

    async def item_retrieve(self, event: dict[str, Any]) -> None:
        item = self.items[self._index(event.get("item_id"), "item_id")]
        await self.send({"type": "conversation.item.retrieved", "item": item})

    async def item_truncate(self, event: dict[str, Any]) -> None:
        item = self.items[self._index(event.get("item_id"), "item_id")]
        if item.get("role") != "assistant" or not item.get("content"):
            raise ClientError("only an assistant message with audio can be truncated", param="item_id")
        audio_end_ms = int(_number(event.get("audio_end_ms"), "audio_end_ms", 0, 2**31 - 1))
        self._truncate(item, audio_end_ms)
        await self.send({"type": "conversation.item.truncated", "item_id": item["id"], "content_index": 0,
                         "audio_end_ms": audio_end_ms})

    def _truncate(self, item: dict[str, Any], audio_end_ms: int) -> None:
        """Keep the transcript of the sentences whose audio had begun by `audio_end_ms`: what was heard."""
        spoken = self.spoken.get(item["id"], [])
        heard = [text for text, began_ms in spoken if began_ms < audio_end_ms]
        part = item["content"][0]
        part["transcript"] = " ".join(heard)

    # -- responses -----------------------------------------------------------------------------------------------

    async def response_create(self, event: dict[str, Any]) -> None:
        if self.kind == "transcription":
            raise ClientError("a transcription session makes no responses", param="type")
        if not self.pipeline.llm:
            raise ClientError(f"model '{self.config.name}' has no llm in its pipeline: it makes no responses",
                              param="type")
        if self.response is not None and not self.response.done():
            raise ClientError("a response is already in progress: cancel it first",
                              code="conversation_already_has_active_response")
        given = _mapping(event.get("response", {}), "response")
        overrides: dict[str, Any] = {}
        if "output_modalities" in given:
            overrides["output_modalities"] = _modalities(given["output_modalities"], "response.output_modalities")
        if "instructions" in given:
            overrides["instructions"] = _string(given["instructions"], "response.instructions")
        if "tools" in given:
            overrides["tools"] = _tools(given["tools"])
        if "tool_choice" in given:
            overrides["tool_choice"] = _tool_choice(given["tool_choice"], "response.tool_choice")
        if given.get("temperature") is not None:
            overrides["temperature"] = _number(given["temperature"], "response.temperature", 0, 2)
        await self._start_response(overrides)

    async def response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None or self.response.done():
            raise ClientError("no response is in progress", code="response_cancel_not_active")
        self.response.cancel()

    async def _start_response(self, overrides: dict[str, Any]) -> None:
        if self.response is not None and not self.response.done():
            self.response.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.response
        self.response = asyncio.create_task(self._respond(overrides))

    def _messages(self, instructions: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
        for item in self.items:
            if item["type"] == "message":
                text = " ".join(part.get("text") or part.get("transcript") or "" for part in item["content"])
                if text.strip():
                    messages.append({"role": item["role"], "content": text})
            elif item["type"] == "function_call":
                call = {"id": item["call_id"], "type": "function",
                        "function": {"name": item["name"], "arguments": item.get("arguments", "")}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item["type"] == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        return messages

    def _chat_request(self, overrides: dict[str, Any], response_id: str) -> ChatRequest:
        """The LLM's request for a reply to the conversation, with the session's settings and `overrides`."""
        tools = _tools(overrides.get("tools", self.tools))
        return ChatRequest(
            model=self.pipeline.llm or "",
            messages=self._messages(overrides.get("instructions", self.instructions)),
            tools=[{"name": t["name"], "description": t.get("description", ""),
                    "parameters": t.get("parameters") or {"type": "object", "properties": {}}} for t in tools],
            tool_choice=_chat_tool_choice(overrides.get("tool_choice", self.tool_choice)) if tools else None,
            temperature=overrides.get("temperature", self.temperature),
            max_tokens=self.max_output_tokens, request_id=response_id)

    async def _respond(self, overrides: dict[str, Any]) -> None:
        response = {"id": new_id("resp"), "object": "realtime.response", "status": "in_progress",
                    "status_details": None, "output": [], "usage": None,
                    "output_modalities": overrides.get("output_modalities", self.modalities)}
        audio = "audio" in response["output_modalities"]
        await self.send({"type": "response.created", "response": response})
        speaker: Speaker | None = None
        item: dict[str, Any] | None = None
        calls: dict[int, dict[str, Any]] = {}  # function_call items by the call's index, arguments as they come
        try:
            text, finished = "", None
            async for event in chat_events(self._chat_request(overrides, response["id"]), self.engine):
                if isinstance(event, TextDelta) and event.text:
                    if item is None:
                        item, speaker = await self._open_message(response, audio)
                    text += event.text
                    kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                    await self.send({"type": kind, "response_id": response["id"], "item_id": item["id"],
                                     "output_index": 0, "content_index": 0, "delta": event.text})
                    if speaker is not None:
                        speaker.add(event.text)
                elif isinstance(event, ToolCallStarted):
                    calls[event.index] = await self._open_call(response, event.id, event.name)
                elif isinstance(event, ToolArgumentsDelta) and event.index in calls and event.text:
                    call_item = calls[event.index]
                    call_item["arguments"] += event.text
                    await self.send({"type": "response.function_call_arguments.delta",
                                     **self._call_ids(response, call_item), "delta": event.text})
                elif isinstance(event, Finished):
                    finished = event
            if item is not None:
                if speaker is not None:
                    await speaker.finish()
                await self._close_message(response, item, text, audio)
            opened = [calls[index] for index in sorted(calls)]
            for n, call in enumerate(finished.message.tool_calls if finished else []):
                call_item = opened[n] if n < len(opened) else await self._open_call(response, call.id, call.name)
                await self._close_call(response, call_item, call.arguments)
            response["status"] = "completed"
            if finished is not None:
                usage = finished.usage
                response["usage"] = {"total_tokens": usage.prompt_tokens + usage.completion_tokens,
                                     "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                                     "input_token_details": {"cached_tokens": usage.cached_tokens, "text_tokens":
                                                             usage.prompt_tokens, "audio_tokens": 0},
                                     "output_token_details": {"text_tokens": usage.completion_tokens,
                                                              "audio_tokens": 0}}
        except asyncio.CancelledError:
            response["status"] = "cancelled"
            response["status_details"] = {"type": "cancelled", "reason": "turn_detected"}
            if speaker is not None:
                speaker.stop()
            if item is not None:
                item["status"] = "incomplete"
                self._truncate(item, speaker.played_ms() if speaker is not None else 0)
            for call_item in calls.values():
                if call_item["status"] == "in_progress":
                    call_item["status"] = "incomplete"
        except SessionGone:
            if speaker is not None:
                speaker.stop()
            return
        except Exception as exc:  # a model's error (HearthError), or a mistake of ours, logged: the reply fails
            if not isinstance(exc, HearthError):
                log.exception("realtime response %s failed", response["id"])
            message = exc.message if isinstance(exc, HearthError) else "the server could not finish the response"
            response["status"] = "failed"
            response["status_details"] = {"type": "failed", "error": {
                "type": "server_error", "code": getattr(exc, "code", "server_error"), "message": message}}
            if speaker is not None:
                speaker.stop()
        await self.send({"type": "response.done", "response": response})

    async def _open_message(self, response: dict[str, Any], audio: bool) -> tuple[dict[str, Any], Speaker | None]:
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        item = {"id": new_id("item"), "type": "message", "object": "realtime.item", "role": "assistant",
                "status": "in_progress", "content": []}
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        response["output"].append(item)
        await self.send({"type": "response.output_item.added", "response_id": response["id"], "output_index": 0,
                         "item": item})
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        item["content"].append(part)
        await self.send({"type": "response.content_part.added", "response_id": response["id"],
                         "item_id": item["id"], "output_index": 0, "content_index": 0, "part": part})
        speaker = Speaker(self, response["id"], item) if audio else None
        return item, speaker

    async def _close_message(self, response: dict[str, Any], item: dict[str, Any], text: str, audio: bool) -> None:
        ids = {"response_id": response["id"], "item_id": item["id"], "output_index": 0, "content_index": 0}
        part = item["content"][0]
        if audio:
            part["transcript"] = text
            await self.send({"type": "response.output_audio.done", **ids})
            await self.send({"type": "response.output_audio_transcript.done", **ids, "transcript": text})
        else:
            part["text"] = text
            await self.send({"type": "response.output_text.done", **ids, "text": text})
        await self.send({"type": "response.content_part.done", **ids, "part": part})
        item["status"] = "completed"
        await self.send({"type": "response.output_item.done", "response_id": response["id"], "output_index": 0,
                         "item": item})
        await self.send({"type": "conversation.item.done", "item": item})

    async def _open_call(self, response: dict[str, Any], call_id: str, name: str) -> dict[str, Any]:
        """A function call's item, announced as soon as the model starts it; its arguments follow as deltas."""
        item = {"id": new_id("item"), "type": "function_call", "object": "realtime.item", "status": "in_progress",
                "call_id": call_id, "name": name, "arguments": ""}
        self.items.append(item)
        response["output"].append(item)
        await self.send({"type": "response.output_item.added", "response_id": response["id"],
                         "output_index": len(response["output"]) - 1, "item": item})
        return item

    @staticmethod
    def _call_ids(response: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        return {"response_id": response["id"], "item_id": item["id"], "call_id": item["call_id"],
                "output_index": next(i for i, one in enumerate(response["output"]) if one is item)}

    async def _close_call(self, response: dict[str, Any], item: dict[str, Any], arguments: str) -> None:
        item["arguments"], item["status"] = arguments, "completed"  # the parser's final text is the one kept
        await self.send({"type": "response.function_call_arguments.done", **self._call_ids(response, item),
                         "name": item["name"], "arguments": arguments})
        await self.send({"type": "response.output_item.done", "response_id": response["id"],
                         "output_index": self._call_ids(response, item)["output_index"], "item": item})
        await self.send({"type": "conversation.item.done", "item": item})


# -- field checks --------------------------------------------------------------------------------------------------


def _mapping(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object", param=param)
    return value


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ClientError(f"{param} must be a string", param=param)
    if "\x00" in value:
        raise ClientError(f"{param} must not contain NUL characters", param=param)
    return value


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ClientError(f"{param} must be a number from {low} to {high}", param=param)
    return float(value)


def _modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(m in ("text", "audio") for m in value):
        raise ClientError(f"{param} must be ['audio'] or ['text']", param=param)
    return ["audio"] if "audio" in value else ["text"]


def _tool_choice(value: Any, param: str) -> Any:
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return value
    raise ClientError(f"{param} must be 'none', 'auto', 'required' or {{'type': 'function', 'name'}}", param=param)


def _chat_tool_choice(choice: Any) -> Any:
    """Realtime's {"type": "function", "name"} in the chat request's (OpenAI chat's) shape."""
    return {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice


def _audio_format(value: Any, param: str) -> AudioFormat:
    kind = value.get("type") if isinstance(value, dict) else value
    chosen = FORMATS.get(kind) if isinstance(kind, str) else None
    if chosen is None:
        raise ClientError(f"{param}: the formats are 'audio/pcm' (pcm16 at 24 kHz), 'audio/pcmu' and 'audio/pcma' "
                          f"(G.711 at 8 kHz); got {kind!r}", param=param)
    if isinstance(value, dict) and value.get("rate", chosen.rate) != chosen.rate:
        raise ClientError(f"{param}: the rate of {chosen.type} is {chosen.rate}", param=param)
    return chosen


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ClientError("tools must be a list", param="session.tools")
    for tool in value:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ClientError("each tool must be {'type': 'function', 'name', 'description', 'parameters'}",
                              param="session.tools")
    return value


HANDLERS: dict[str, Callable[[Session, dict[str, Any]], Awaitable[None]]] = {
    "session.update": Session.session_update,
    "transcription_session.update": Session.transcription_session_update,
    "input_audio_buffer.append": Session.buffer_append,
    "input_audio_buffer.commit": Session.buffer_commit,
    "input_audio_buffer.clear": Session.buffer_clear,
    "conversation.item.create": Session.item_create,
    "conversation.item.delete": Session.item_delete,
    "conversation.item.retrieve": Session.item_retrieve,
    "conversation.item.truncate": Session.item_truncate,
    "response.create": Session.response_create,
    "response.cancel": Session.response_cancel,
}
