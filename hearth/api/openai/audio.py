"""OpenAI's audio API: /v1/audio/transcriptions, /v1/audio/translations, /v1/audio/speech (and LocalAI's /tts)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from hearth.api.openai.common import read_form, refuse_unknown
from hearth.api.routing import HearthRoute
from hearth.api.streaming import primed, sse_response, until_disconnect
from hearth.engine import Engine
from hearth.errors import InvalidRequest
from hearth.runner import hearth_pb2 as pb

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SPEECH_FORMATS = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                  "wav": "audio/wav", "pcm": "audio/pcm"}
MAX_SPEECH_CHARACTERS = 4096
FORM_FIELDS = {"file", "model", "language", "prompt", "temperature", "response_format", "timestamp_granularities[]",
               "timestamp_granularities", "stream", "chunking_strategy", "include[]"}
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}


# -- transcription -------------------------------------------------------------------------------------------


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (VTT); hours keep counting past 99."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[pb.Segment]) -> str:
    blocks = [f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
              for i, s in enumerate(segments, 1)]
    return "\n".join(blocks)


def vtt(segments: list[pb.Segment]) -> str:
    blocks = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


async def _form(request: Request) -> dict[str, Any]:
    """The multipart form, checked: every field known, `file` a file, numbers numbers."""
    form = await read_form(request, FORM_FIELDS, "a 'file'")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("'file' is required: the audio file to transcribe", param="file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    fields: dict[str, Any] = {"file": upload, "model": model}
    for key in ("language", "prompt", "response_format"):
        value = form.get(key)
        fields[key] = value if isinstance(value, str) else ""
    fields["response_format"] = fields["response_format"] or "json"
    if fields["response_format"] not in TRANSCRIPTION_FORMATS:
        raise InvalidRequest(f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}",
                             param="response_format")
    temperature = form.get("temperature")
    fields["temperature"] = None
    if isinstance(temperature, str) and temperature:
        try:
            fields["temperature"] = float(temperature)
        except ValueError:
            raise InvalidRequest("temperature must be a number", param="temperature") from None
        if not 0 <= fields["temperature"] <= 1:
            raise InvalidRequest("temperature must be between 0 and 1", param="temperature")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for value in granularities:
        if value not in ("word", "segment"):
            raise InvalidRequest("timestamp_granularities must be 'word' and/or 'segment'",
                                 param="timestamp_granularities")
    if granularities and fields["response_format"] != "verbose_json":
        raise InvalidRequest("timestamp_granularities needs response_format 'verbose_json'",
                             param="timestamp_granularities")
    fields["words"] = "word" in granularities
    stream = form.get("stream")
    fields["stream"] = isinstance(stream, str) and stream.lower() in ("true", "1")
    return fields


async def _segments(engine: Engine, fields: dict[str, Any], translate: bool) -> AsyncIterator[Any]:
    """The runner's replies: segments as they are recognised, then the done reply."""
    config = engine.model(fields["model"])
    audio = await fields["file"].read()
    if not audio:
        raise InvalidRequest("the audio file is empty", param="file")
    request = pb.TranscribeRequest(audio=audio, filename=fields["file"].filename or "", language=fields["language"],
                                   prompt=fields["prompt"], translate=translate, word_timestamps=fields["words"])
    if fields["temperature"] is not None:
        request.temperature = fields["temperature"]
    async with engine.runner(config, "translate" if translate else "transcribe") as runner:
        async for reply in runner.stream("transcribe", request):
            yield reply


async def transcription(request: Request, translate: bool) -> Any:
    engine: Engine = request.app.state.engine
    fields = await _form(request)
    if translate and fields["language"]:
        raise InvalidRequest("translations take no 'language': the output is always English", param="language")
    if fields["stream"]:
        async def events() -> AsyncIterator[dict[str, Any]]:
            texts = []
            async for reply in _segments(engine, fields, translate):
                if reply.done:
                    yield {"type": "transcript.text.done", "text": "".join(texts).strip()}
                elif reply.segment.text:
                    delta = reply.segment.text if texts else reply.segment.text.lstrip()
                    texts.append(delta)
                    yield {"type": "transcript.text.delta", "delta": delta}

        return sse_response(await primed(events()), done=None)

    async def whole() -> Any:
        segments, done = [], None
        async for reply in _segments(engine, fields, translate):
            if reply.done:
                done = reply
            else:
                segments.append(reply.segment)
        return _respond(fields, segments, done, translate)

    return await until_disconnect(request, whole())


def _respond(fields: dict[str, Any], segments: list[pb.Segment], done: Any, translate: bool) -> Any:
    text = "".join(s.text for s in segments).strip()
    duration = done.duration if done is not None else 0.0
    fmt = fields["response_format"]
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "srt":
        return PlainTextResponse(srt(segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(vtt(segments), media_type="text/vtt")
    usage = {"type": "duration", "seconds": round(duration, 3)}
    if fmt == "json":
        return {"text": text, "usage": usage}
    language = done.language if done is not None else ""
    body: dict[str, Any] = {
        "task": "translate" if translate else "transcribe",
        "language": "english" if translate else LANGUAGES.get(language, language),
        "duration": round(duration, 3),
        "text": text,
        "segments": [{
            "id": index, "seek": int(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
            "text": s.text, "tokens": list(s.tokens), "temperature": round(s.temperature, 2),
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        } for index, s in enumerate(segments)],
        "usage": usage,
    }
    if fields["words"]:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                         for s in segments for w in s.words]
    return body


# -- speech --------------------------------------------------------------------------------------------------


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str
    voice: str | dict[str, Any] = "default"
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio", "sse"] | None = None


async def speech(body: SpeechRequest, engine: Engine) -> StreamingResponse:
    refuse_unknown(body)
    if not body.input.strip():
        raise InvalidRequest("input must not be empty", param="input")
    if len(body.input) > MAX_SPEECH_CHARACTERS:
        raise InvalidRequest(f"input is {len(body.input)} characters; the limit is {MAX_SPEECH_CHARACTERS}",
                             param="input")
    if "\x00" in body.input:  # voices read their text as a C string
        raise InvalidRequest("input must not contain NUL characters", param="input")
    if body.instructions:
        raise InvalidRequest("instructions are not supported by this voice model", param="instructions")
    if body.stream_format == "sse":
        raise InvalidRequest("stream_format 'sse' is not supported; the audio itself is streamed", param="stream_format")
    voice = body.voice if isinstance(body.voice, str) else str(body.voice.get("id", ""))
    if "\x00" in voice:
        raise InvalidRequest("voice must not contain NUL characters", param="voice")
    config = engine.model(body.model)
    request = pb.SpeakRequest(text=body.input, voice=voice, speed=body.speed, response_format=body.response_format)

    async def pieces() -> AsyncIterator[bytes]:
        async with engine.runner(config, "speak") as runner:
            async for reply in runner.stream("speak", request):
                if reply.audio:
                    yield reply.audio

    stream = await primed(pieces())  # errors before the first byte stay HTTP errors

    async def body_bytes() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(stream):
            async for piece in stream:
                yield piece

    return StreamingResponse(body_bytes(), media_type=SPEECH_FORMATS[body.response_format],
                             headers={"Cache-Control": "no-cache"})


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/audio/transcriptions")
@router.post("/audio/transcriptions", include_in_schema=False)
async def transcriptions_route(request: Request) -> Any:
    return await transcription(request, translate=False)


@router.post("/v1/audio/translations")
@router.post("/audio/translations", include_in_schema=False)
async def translations_route(request: Request) -> Any:
    return await transcription(request, translate=True)


@router.post("/v1/audio/speech")
@router.post("/audio/speech", include_in_schema=False)
async def speech_route(body: SpeechRequest, request: Request) -> Any:
    return await speech(body, request.app.state.engine)


class LocalAITTSRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str
    voice: str = "default"
    backend: str | None = None
    language: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "wav"


@router.post("/tts")
@router.post("/v1/tts", include_in_schema=False)
async def localai_tts_route(body: LocalAITTSRequest, request: Request) -> Any:
    """LocalAI's TTS endpoint: WAV by default; `backend` and `language` are accepted and the model decides."""
    refuse_unknown(body)
    speech_body = SpeechRequest(model=body.model, input=body.input, voice=body.voice,
                                response_format=body.response_format)
    return await speech(speech_body, request.app.state.engine)

