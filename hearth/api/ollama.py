"""Ollama's API over the same models: its requests mapped onto `ChatRequest` (chat, generate) and the embeddings
serving code, chat events encoded as Ollama's NDJSON records (`message.thinking` carries the thoughts).

/api/chat and /api/generate (NDJSON streams by default), /api/embed and /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version, /api/pull (through the gallery), /api/delete. Errors are {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth import __version__
from hearth.api.openai.common import USAGE_KEY, SamplingRequest
from hearth.api.openai.embeddings import EmbeddingRequest, create_embeddings
from hearth.api.routing import HearthRoute
from hearth.api.streaming import primed
from hearth.chat.grammar import SchemaNotSupported, json_object_grammar, schema_grammar
from hearth.chat.request import ChatRequest, Finished, Reasoning, ReasoningDelta, TextDelta
from hearth.chat.serving import chat_events, tool_arguments
from hearth.engine import Engine
from hearth.errors import HearthError, InvalidRequest, NotFound

OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "num_predict": "max_tokens", "repeat_penalty": "repeat_penalty", "seed": "seed", "stop": "stop",
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                "typical_p": "typical_p", "repeat_last_n": "repeat_last_n"}
IGNORED_OPTIONS = {"num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "use_mmap", "use_mlock", "numa",
                   "num_keep", "low_vram"}  # how the model is run, which the model's YAML decides here
DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def model_name(name: str) -> str:
    """Ollama's names carry a tag; `:latest` is what a bare name means."""
    return name[: -len(":latest")] if name.endswith(":latest") else name


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: seconds (number) or a duration ("5m", "1h", "0"); negative keeps the model loaded."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    match = DURATION.fullmatch(str(value).strip())
    if not match:
        raise InvalidRequest(f"keep_alive '{value}' is not a duration such as 30s, 5m or 0", param="keep_alive")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None  # true, false, or gpt-oss's "low" | "medium" | "high"


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    images: list[str] | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    keep_alive: float | str | None = None
    think: bool | str | None = None


def _error(message: str) -> dict[str, str]:
    """Ollama's error shape, for responses and in-stream records."""
    return {"error": message}


def error_body(status: int, message: str) -> dict[str, str]:
    """Ollama's error response (the status travels as the HTTP status only)."""
    return _error(message)


def _reasoning(think: bool | str | None) -> Reasoning:
    """Ollama's `think`: true or false, or an effort for models that take one; unset leaves the model's default."""
    if think is None:
        return Reasoning()
    if think is False:
        return Reasoning(effort="none")
    if think is True:
        return Reasoning()
    if think in ("low", "medium", "high"):
        return Reasoning(effort=think)
    raise InvalidRequest(f"think '{think}' is not one of true, false, low, medium, high", param="think")


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for index, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequest(f"tools[{index}] needs a 'function' object", param=f"tools[{index}]")
        out.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    return out


def _sampling(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if key in OPTION_NAMES:
            out[OPTION_NAMES[key]] = value
        elif key not in IGNORED_OPTIONS:
            raise InvalidRequest(f"option '{key}' is not supported", param=f"options.{key}")
    checked = SamplingRequest(model="-", **out)  # the same bounds as OpenAI's fields; a ValidationError is a 400
    return {key: getattr(checked, key) for key in out}


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise InvalidRequest("format must be 'json' or a JSON schema", param="format")


def _image_part(data: str) -> dict[str, Any]:
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequest("images must be base64-encoded", param="images") from None
    kind = "jpeg" if raw[:3] == b"\xff\xd8\xff" else "png"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}


def _chat_message(message: OllamaMessage) -> dict[str, Any]:
    if message.role not in ("system", "user", "assistant", "tool"):
        raise InvalidRequest(f"message role '{message.role}' is not one of system, user, assistant, tool",
                             param="messages")
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    thinking = (message.model_extra or {}).get("thinking")
    if isinstance(thinking, str) and thinking and message.role == "assistant":
        item["reasoning_content"] = thinking
    if message.images:
        item["content"] = [{"type": "text", "text": message.content}, *map(_image_part, message.images)]
    if message.tool_calls:
        functions = [c.get("function") for c in message.tool_calls]
        if not all(isinstance(f, dict) for f in functions):
            raise InvalidRequest("each tool call needs a 'function' object", param="messages")
        item["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                               "function": {"name": str(f.get("name", "")),
                                            "arguments": json.dumps(f.get("arguments", {}))}}
                              for i, f in enumerate(functions)]
    if message.role == "tool":
        item["tool_call_id"] = "call_0"
    return item


def _nanos(ms: float) -> int:
    return int(ms * 1_000_000)


async def _run(engine: Engine, request: ChatRequest, model: str, keep_alive: Any,
               shape: str) -> AsyncIterator[dict[str, Any]]:
    """Ollama's records (chat: `message`; generate: `response`) from the chat events."""
    started = time.perf_counter()
    async for event in chat_events(request, engine):
        if isinstance(event, TextDelta | ReasoningDelta) and event.text:
            field = "thinking" if isinstance(event, ReasoningDelta) else "content"
            if shape == "chat":
                body: dict[str, Any] = {"message": {"role": "assistant", "content": "", field: event.text}}
            else:
                body = {"response": "" if field == "thinking" else event.text}
                if field == "thinking":
                    body["thinking"] = event.text
            yield {"model": model, "created_at": now_iso(), **body, "done": False}
        elif isinstance(event, Finished):
            usage, timings = event.usage, event.timings
            final: dict[str, Any] = {"model": model, "created_at": now_iso()}
            if shape == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": ""}
                if event.message.tool_calls:
                    message["tool_calls"] = [{"function": {"name": c.name, "arguments": tool_arguments(c.arguments)}}
                                             for c in event.message.tool_calls]
                final["message"] = message
            else:
                final["response"] = ""
            final.update({
                "done": True, "done_reason": "length" if event.reason == "length" else "stop",
                "total_duration": _nanos((time.perf_counter() - started) * 1000),
                "load_duration": 0, "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_cached_count": usage.cached_tokens,
                "prompt_eval_duration": _nanos(timings.get("prompt_ms", 0.0)),
                "eval_count": usage.completion_tokens, "eval_duration": _nanos(timings.get("predicted_ms", 0.0)),
                FINISHED: event,
            })
            yield final
    seconds = keep_alive_seconds(keep_alive)
    if seconds is not None:
        await _keep_alive(engine, model, seconds)


FINISHED = "_finished"  # the Finished event on the last record inside this module, for the whole answer


async def _keep_alive(engine: Engine, name: str, seconds: float) -> None:
    config = engine.model(name)
    runner = engine.runners.runners.get(config.name)
    if seconds == 0:
        await engine.runners.unload(config.name)
    elif runner is not None:
        runner.keep_alive = seconds


async def _respond(events: AsyncIterator[dict[str, Any]], stream: bool) -> Any:
    if not stream:
        last: dict[str, Any] | None = None
        text = []
        async for item in events:
            text.append(item.get("response") or "")
            last = item
        assert last is not None
        finished: Finished | None = last.pop(FINISHED, None)
        if finished is None:  # a raw prompt's completion
            last["response"] = "".join(text)
        else:
            said = finished.message
            if "message" in last:
                last["message"]["content"] = said.content
                if said.reasoning:
                    last["message"]["thinking"] = said.reasoning
            else:
                last["response"] = said.content
                if said.reasoning:
                    last["thinking"] = said.reasoning
        return last
    first = await primed(events)  # errors before the first line stay HTTP errors

    async def lines() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(first):
                async for item in first:
                    item.pop(FINISHED, None)
                    yield (json.dumps(item, ensure_ascii=False) + "\n").encode()
        except HearthError as exc:
            yield (json.dumps(_error(exc.message)) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


router = APIRouter(route_class=HearthRoute)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> Response:
    """What Ollama's clients probe for (GET / is the web page unless --no-web)."""
    return Response("Hearth is running\n", media_type="text/plain")


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/api/tags")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    models = []
    for config in engine.registry.models():
        path = config.model_path
        size = 0
        with contextlib.suppress(OSError, TypeError):
            from pathlib import Path

            size = Path(path).stat().st_size if path else 0
        for name in config.names:
            models.append({"name": name, "model": name, "modified_at": now_iso(), "size": size,
                           "digest": "", "details": {"format": "gguf" if str(path).endswith(".gguf") else "",
                                                     "family": config.canonical_backend}})
    return {"models": models}


class NameBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None
    stream: bool = True

    def target(self) -> str:
        value = self.model or self.name
        if not value:
            raise InvalidRequest("model is required", param="model")
        return model_name(value)


@router.post("/api/show")
async def show(body: NameBody, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    config = engine.registry.lookup(body.target())
    if config is None:
        raise NotFound(f"model '{body.target()}' not found")
    parameters = "\n".join(f"{key} {value}" for key, value in config.parameters.model_dump(exclude_none=True).items()
                           if key != "model")
    return {"modelfile": f"FROM {config.parameters.model or config.name}\n", "parameters": parameters,
            "template": config.template.chat or "", "details": {"family": config.canonical_backend},
            "model_info": {"general.name": config.name}, "capabilities": _ollama_capabilities(config.usecases)}


# Ollama's capability words for Hearth's (LocalAI's) usecases; clients such as Open WebUI offer image upload on
# "vision".
OLLAMA_CAPABILITIES = {"chat": "completion", "completion": "completion", "embeddings": "embedding",
                       "vision": "vision"}


def _ollama_capabilities(usecases: list[str]) -> list[str]:
    found = []
    for usecase in usecases:
        word = OLLAMA_CAPABILITIES.get(usecase, usecase)
        if word not in found:
            found.append(word)
    return found


@router.get("/api/ps")
@router.head("/api/ps", include_in_schema=False)
async def ps(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    return {"models": [{"name": status["name"], "model": status["name"], "size": 0, "digest": "",
                        "details": {"family": status["backend"]}, "expires_at": None}
                       for status in engine.runners.status()]}


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    name = model_name(body.model)
    if not body.messages:
        seconds = keep_alive_seconds(body.keep_alive)
        if seconds == 0:
            await _keep_alive(engine, name, 0)
            return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                    "done_reason": "unload", "done": True}
        engine.model(name)
        return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}
    chat_request = ChatRequest(model=name, messages=[_chat_message(m) for m in body.messages],
                               response_format=_response_format(body.format), tools=_tools(body.tools),
                               reasoning=_reasoning(body.think), params={"response_format": "format"},
                               **_sampling(body.options))
    return await _respond(_run(engine, chat_request, body.model, body.keep_alive, "chat"), body.stream)


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    name = model_name(body.model)
    extra = body.model_extra or {}
    if extra.get("template"):
        raise InvalidRequest("template is not supported: the model's YAML decides its chat template (or send raw: "
                             "true with the prompt already formatted)", param="template")
    if extra.get("context"):
        raise InvalidRequest("context is not supported: send the conversation to /api/chat as messages",
                             param="context")
    if not body.prompt and not body.images:
        seconds = keep_alive_seconds(body.keep_alive)
        if seconds == 0:
            await _keep_alive(engine, name, 0)
        return {"model": body.model, "created_at": now_iso(), "response": "",
                "done_reason": "unload" if seconds == 0 else "load", "done": True}
    if body.raw:
        return await _raw(engine, body, name)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        _chat_message(OllamaMessage(role="user", content=body.prompt, images=body.images))]
    chat_request = ChatRequest(model=name, messages=messages, response_format=_response_format(body.format),
                               reasoning=_reasoning(body.think), params={"response_format": "format"},
                               **_sampling(body.options))
    return await _respond(_run(engine, chat_request, body.model, body.keep_alive, "generate"), body.stream)


def _raw_grammar(fmt: Any) -> str | None:
    """`format` for a raw prompt, which takes no response_format: the grammar it stands for."""
    if _response_format(fmt) is None:
        return None
    if fmt == "json":
        return json_object_grammar()
    try:
        return schema_grammar(fmt)
    except SchemaNotSupported as exc:
        raise InvalidRequest(str(exc), param="format") from None


async def _raw(engine: Engine, body: GenerateBody, name: str) -> Any:
    """raw: the prompt goes to the model as it is, with no template (a completion)."""
    from hearth.api.openai.completions import CompletionRequest, completion_events

    if body.images:
        raise InvalidRequest("images cannot be sent with raw: true: with no template there is no place for them in "
                             "the prompt", param="images")
    sampling = _sampling(body.options)
    sampling.setdefault("max_tokens", 128)
    completion = CompletionRequest(model=name, prompt=body.prompt, suffix=body.suffix, grammar=_raw_grammar(body.format),
                                   **sampling)

    async def events() -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        async for chunk in completion_events(completion, engine):
            choice = chunk["choices"][0]
            if choice["text"]:
                yield {"model": body.model, "created_at": now_iso(), "response": choice["text"], "done": False}
            if choice["finish_reason"]:
                usage, timings = chunk[USAGE_KEY], chunk.get("timings") or {}
                yield {"model": body.model, "created_at": now_iso(), "response": "", "done": True,
                       "done_reason": "length" if choice["finish_reason"] == "length" else "stop",
                       "total_duration": _nanos((time.perf_counter() - started) * 1000), "load_duration": 0,
                       "prompt_eval_count": usage.prompt_tokens,
                       "prompt_eval_cached_count": usage.cached_tokens,
                       "prompt_eval_duration": _nanos(timings.get("prompt_ms", 0.0)),
                       "eval_count": usage.completion_tokens,
                       "eval_duration": _nanos(timings.get("predicted_ms", 0.0))}

    return await _respond(events(), body.stream)


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | None = None
    prompt: str | None = None  # /api/embeddings
    truncate: bool = True
    dimensions: int | None = None
    keep_alive: float | str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    started = time.perf_counter()
    if body.input is None:
        raise InvalidRequest("input is required", param="input")
    reply = await create_embeddings(EmbeddingRequest(model=model_name(body.model), input=body.input,
                                                     dimensions=body.dimensions), engine)
    return {"model": body.model, "embeddings": [item["embedding"] for item in reply["data"]],
            "total_duration": _nanos((time.perf_counter() - started) * 1000), "load_duration": 0,
            "prompt_eval_count": reply["usage"]["prompt_tokens"]}


@router.post("/api/embeddings")
async def embeddings(body: EmbedBody, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    if body.prompt is None:
        raise InvalidRequest("prompt is required", param="prompt")
    reply = await create_embeddings(EmbeddingRequest(model=model_name(body.model), input=body.prompt), engine)
    return {"embedding": reply["data"][0]["embedding"]}


@router.post("/api/pull")
async def pull(body: NameBody, request: Request) -> Any:
    """Through the gallery: progress lines while it downloads, then {"status": "success"}."""
    from hearth.api.gallery import catalog_of, jobs_of, require_admin

    require_admin(request)
    engine: Engine = request.app.state.engine
    name = body.target()
    found = (await catalog_of(request).listing()).find(name)
    if found is None:
        raise NotFound(f"pull model manifest: file does not exist ('{name}' is in no gallery)")
    if found.entry is None or not found.available:
        raise InvalidRequest(f"'{name}' cannot be installed here: {found.assessment.reason}", param="model")
    job = jobs_of(request).start(engine.settings, catalog_of(request), found.entry, None, {})

    async def progress() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        while job.state in ("queued", "downloading"):
            yield {"status": f"pulling {job.transfer.stage or name}", "digest": "", "total": job.transfer.total,
                   "completed": job.transfer.done}
            await asyncio.sleep(0.5)
        if job.state != "done":
            yield _error(job.error or job.state)
            return
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    if not body.stream:
        last: dict[str, Any] = {}
        async for item in progress():
            last = item
        if "error" in last:
            raise HearthError(last["error"])
        return last

    async def lines() -> AsyncIterator[bytes]:
        async for item in progress():
            yield (json.dumps(item) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete("/api/delete")
async def delete(body: NameBody, request: Request) -> Response:
    from hearth.api.gallery import require_admin
    from hearth.gallery.download import DownloadError
    from hearth.gallery.install import delete_model

    require_admin(request)
    engine: Engine = request.app.state.engine
    config = engine.registry.lookup(body.target())
    if config is None:
        raise NotFound(f"model '{body.target()}' not found")
    await engine.runners.unload(config.name)
    try:
        await asyncio.to_thread(delete_model, config.name, engine.settings.models_dir, engine.registry.models())
    except DownloadError as exc:
        raise InvalidRequest(str(exc), param="model") from None
    return Response(status_code=200)
