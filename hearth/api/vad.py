"""LocalAI's voice activity detection: POST /v1/vad (and /vad).

JSON as LocalAI takes it, `{model, audio: [float32 samples at 16 kHz]}`, or a multipart upload of an audio file
(`file`, `model`); the answer is `{segments: [{start, end}]}` in seconds, plus the audio's `duration`. Hearth's own
optional fields set the detection: `threshold`, `min_silence_ms`, `speech_pad_ms`, `min_speech_ms`.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from hearth.api.openai.common import read_form
from hearth.api.routing import HearthRoute
from hearth.engine import Engine
from hearth.errors import InvalidRequest
from hearth.runner import hearth_pb2 as pb

MAX_SAMPLES = 16_000 * 60 * 30  # half an hour at 16 kHz
SETTINGS = ("threshold", "min_silence_ms", "speech_pad_ms", "min_speech_ms")


class VadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    audio: list[float] = Field(default_factory=list, max_length=MAX_SAMPLES)
    threshold: float | None = Field(None, gt=0, lt=1)
    min_silence_ms: int | None = Field(None, ge=0, le=60_000)
    speech_pad_ms: int | None = Field(None, ge=0, le=10_000)
    min_speech_ms: int | None = Field(None, ge=0, le=60_000)

    @field_validator("audio")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("audio samples must be finite numbers")
        return value


async def detect_speech(body: VadRequest, engine: Engine, audio_file: bytes = b"") -> dict[str, Any]:
    if not body.audio and not audio_file:
        raise InvalidRequest("'audio' is required: float32 samples at 16 kHz (or upload an audio 'file')",
                             param="audio")
    config = engine.model(body.model)
    request = pb.VadRequest(samples=body.audio, audio=audio_file)
    for name in SETTINGS:
        if getattr(body, name) is not None:
            setattr(request, name, getattr(body, name))
    async with engine.runner(config, "vad") as runner:
        reply: pb.VadReply = await runner.call("detect_speech", request)
    return {"segments": [{"start": s.start, "end": s.end} for s in reply.segments],
            "duration": round(reply.duration, 3)}


async def _body(request: Request) -> tuple[VadRequest, bytes]:
    """The JSON body, or a multipart form with the audio as a file."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return VadRequest.model_validate_json(await request.body()), b""
    form = await read_form(request, {"file", "model", *SETTINGS}, "a 'file'")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("'file' is required: the audio file to read", param="file")
    fields = {key: value for key, value in form.items() if key != "file" and isinstance(value, str)}
    audio = await upload.read()
    if not audio:
        raise InvalidRequest("the audio file is empty", param="file")
    return VadRequest.model_validate(fields), audio


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/vad")
@router.post("/vad", include_in_schema=False)
async def vad_route(request: Request) -> dict[str, Any]:
    try:
        body, audio = await _body(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
        raise InvalidRequest(f"{field}: {first['msg']}" if field else first["msg"], param=field) from None
    return await detect_speech(body, request.app.state.engine, audio)
