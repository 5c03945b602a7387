"""The OpenAPI document as Hearth really answers: every operation's errors (in its API's shape), bodies that are
forms, and the media types of streams, audio and text.

FastAPI's own document declares a 422 Hearth never sends (invalid bodies are OpenAI's 400) and knows nothing of
routes that read their form by hand; the fuzz suite (tests/test_fuzz.py) checks every answer against this one.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from hearth.api.vad import SETTINGS as VAD_SETTINGS
from hearth.api.vad import VadRequest

ERRORS = {"400": "Invalid request: the message names the field", "401": "No or wrong API key",
          "403": "The key may not do this (installs and deletes take the admin key)",
          "404": "No such model, route or object", "405": "Method not allowed", "408": "The client was too slow",
          "413": "The request body is larger than the limit", "429": "The model's queue is full (see Retry-After)",
          "503": "The server is busy, shutting down, or a model's runner failed (see Retry-After)"}
OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"], "properties": {
        "type": {"type": "string"}, "message": {"type": "string"}}}}}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
STRING = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}
# 200 bodies beyond JSON, by path.
STREAMS = {"/v1/chat/completions": "text/event-stream", "/v1/completions": "text/event-stream",
           "/v1/responses": "text/event-stream", "/v1/messages": "text/event-stream",
           "/api/chat": "application/x-ndjson", "/api/generate": "application/x-ndjson",
           "/api/pull": "application/x-ndjson"}
OTHER_BODIES = {
    "/metrics": {"text/plain": {"schema": STRING}},
    "/v1/audio/transcriptions": {"application/json": {"schema": {"type": "object"}}, "text/plain": {"schema": STRING},
                                 "text/event-stream": {"schema": STRING}},
    "/v1/audio/translations": {"application/json": {"schema": {"type": "object"}}, "text/plain": {"schema": STRING}},
    "/v1/audio/speech": {mime: {"schema": BINARY} for mime in ("audio/mpeg", "audio/ogg", "audio/aac", "audio/flac",
                                                               "audio/wav", "audio/pcm")},
    "/tts": {"audio/wav": {"schema": BINARY}, "audio/mpeg": {"schema": BINARY}},
    "/generated-images/{name}": {"image/png": {"schema": BINARY}},
    "/api/delete": {"text/plain": {"schema": STRING}},
}


def _form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}


TRANSCRIPTION_FORM = _form({
    "file": BINARY, "model": STRING, "language": STRING, "prompt": STRING,
    "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"]},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
    "stream": {"type": "boolean"}}, ["file", "model"])
IMAGE_FORM = _form({
    "image": BINARY, "mask": BINARY, "prompt": STRING, "negative_prompt": STRING, "model": STRING,
    "n": {"type": "integer", "minimum": 1, "maximum": 10}, "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
    "response_format": {"type": "string", "enum": ["url", "b64_json"]},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}, "steps": {"type": "integer", "minimum": 1,
                                                                              "maximum": 500},
    "guidance_scale": {"type": "number", "minimum": 0, "maximum": 50},
    "strength": {"type": "number", "minimum": 0.01, "maximum": 1}}, ["image"])
FORMS = {"/v1/audio/transcriptions": TRANSCRIPTION_FORM, "/v1/audio/translations": TRANSCRIPTION_FORM,
         "/v1/images/edits": IMAGE_FORM, "/v1/images/variations": IMAGE_FORM}


def _error_schema(path: str) -> str:
    if path.startswith("/api/"):
        return "OllamaError"
    if path.startswith("/v1/messages"):
        return "AnthropicError"
    return "Error"


def build(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update({"Error": OPENAI_ERROR, "AnthropicError": ANTHROPIC_ERROR, "OllamaError": OLLAMA_ERROR})
    vad = VadRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(vad.pop("$defs", {}))
    components["VadRequest"] = vad
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are 400s here, in each API's own shape
            schema = {"$ref": f"#/components/schemas/{_error_schema(path)}"}
            for status, description in ERRORS.items():
                responses[status] = {"description": description, "content": {"application/json": {"schema": schema}}}
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if path in OTHER_BODIES:
                ok["content"] = dict(OTHER_BODIES[path])
            elif path in STREAMS and method == "post":
                ok.setdefault("content", {})[STREAMS[path]] = {"schema": STRING}
            if path in FORMS and method == "post":
                operation["requestBody"] = FORMS[path]
            if path == "/v1/vad" and method == "post":
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/VadRequest"}},
                    "multipart/form-data": {"schema": {"type": "object", "required": ["file", "model"], "properties": {
                        "file": BINARY, "model": STRING, **{name: {"type": "number"} for name in VAD_SETTINGS}}}}}}
    return document


def install(app: FastAPI) -> None:
    """Serve `build(app)` as /openapi.json (made once, on first use)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
