"""POST /v1/chat/completions: request model, serving logic, route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.openai.common import (
    INT32_MAX,
    USAGE_KEY,
    SamplingRequest,
    new_id,
    now,
    refuse_unsupported,
    respond,
    sampling_params,
    stop_list,
    timings_dict,
    usage_dict,
)
from hearth.chat.template import render_chat
from hearth.engine import Engine
from hearth.errors import CapabilityNotSupported, InvalidRequest
from hearth.runner import hearth_pb2 as pb


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageUrl


class AudioPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    refuse_unsupported(request)
    if request.tools or request.functions:
        raise InvalidRequest("tool calling is not supported yet by this Hearth version", param="tools")
    if request.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice is not supported yet by this Hearth version", param="tool_choice")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise InvalidRequest(
            f"response_format '{request.response_format.get('type')}' is not supported yet; only 'text' is",
            param="response_format")
    if request.logprobs:
        raise InvalidRequest("logprobs are not supported yet by this Hearth version", param="logprobs")
    for index, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if not isinstance(part, TextPart):
                    kind = "images" if isinstance(part, ImagePart) else "audio"
                    raise CapabilityNotSupported(
                        f"model '{request.model}' does not accept {kind}; only text content is supported",
                        param=f"messages[{index}].content")


def _template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for message in request.messages:
        item = message.model_dump(exclude_none=True)
        if item["role"] == "developer":
            item["role"] = "system"  # OpenAI's newer name; chat templates know "system"
        messages.append(item)
    return messages


def _chunk(request_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def chat_completion_events(request: ChatCompletionRequest, engine: Engine) -> AsyncIterator[dict[str, Any]]:
    """The chat completion as OpenAI stream chunks; the first arrives only once generation has begun."""
    _refuse_unsupported(request)
    config = engine.model(request.model)
    stops = stop_list(request, config)
    sampling = sampling_params(request, config)
    max_tokens = request.max_completion_tokens or request.max_tokens or config.parameters.max_tokens or 0
    request_id, created = new_id("chatcmpl"), now()

    async with engine.runner(config, "generate") as runner:
        info = runner.info
        assert info is not None
        template = config.template.chat or info.chat_template
        if not template:
            raise CapabilityNotSupported(
                f"model '{request.model}' has no chat template, so it cannot chat; use /v1/completions with a "
                f"prompt, or set template.chat (Jinja) in its YAML ({config.source_file})", param="model")
        prompt = render_chat(template, _template_messages(request), bos_token=info.bos_token,
                             eos_token=info.eos_token, strip_bos=info.add_bos)
        generate = pb.GenerateRequest(prompt=prompt, parse_special=True, add_special=True, max_tokens=max_tokens,
                                      stop=stops, sampling=sampling, request_id=request_id,
                                      ignore_eos=request.ignore_eos)
        first = True
        async for reply in runner.generate(generate):
            if first:
                yield _chunk(request_id, created, request.model, {"role": "assistant", "content": ""}, None)
                first = False
            if reply.text:
                yield _chunk(request_id, created, request.model, {"content": reply.text}, None)
            if reply.finish_reason:
                final = _chunk(request_id, created, request.model, {}, reply.finish_reason)
                final["timings"] = timings_dict(reply.timings)
                final[USAGE_KEY] = reply.usage
                yield final


async def create_chat_completion(request: ChatCompletionRequest, engine: Engine) -> dict[str, Any]:
    """The whole (non-streaming) chat completion response."""
    content: list[str] = []
    finish, usage, timings, request_id, created = "stop", None, None, "", 0
    async for chunk in chat_completion_events(request, engine):
        request_id, created = chunk["id"], chunk["created"]
        choice = chunk["choices"][0]
        content.append(choice["delta"].get("content") or "")
        if choice["finish_reason"]:
            finish, usage, timings = choice["finish_reason"], usage_dict(chunk[USAGE_KEY]), chunk["timings"]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(content), "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": usage,
        "timings": timings,
    }


router = APIRouter()


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    return await respond(request, body.stream, body.include_usage(), lambda: chat_completion_events(body, engine),
                         lambda: create_chat_completion(body, engine))
