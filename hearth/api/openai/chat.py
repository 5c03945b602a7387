"""POST /v1/chat/completions: OpenAI's request model, its mapping onto `ChatRequest`, and the encoder of chat
events as OpenAI chunks (streamed) or one chat.completion (whole).

Every OpenAI chat parameter is honoured or refused with a 400 naming it. The model's thoughts go out as
`reasoning_content` (llama-server's name) and `reasoning` (vLLM's and Ollama's), or one of them (the model YAML's
`reasoning.field`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.openai.common import (
    INT32_MAX,
    PROMPT_KEY,
    STOP_KEY,
    USAGE_KEY,
    SamplingRequest,
    new_id,
    now,
    refuse_unsupported,
    respond,
    total_usage,
)
from hearth.api.routing import HearthRoute
from hearth.chat.request import (
    ChatEvent,
    ChatRequest,
    Finished,
    Reasoning,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStarted,
)
from hearth.chat.serving import chat_events, count_prompt_tokens
from hearth.engine import Engine
from hearth.errors import CapabilityNotSupported, InvalidRequest

MAX_TOOLS = 128
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
REASONING_FORMATS = ("auto", "none", "deepseek", "deepseek-legacy", "deepseek_legacy")


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


class FilePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a prior turn's thoughts (llama-server's name)
    reasoning: str | None = None  # the same, as vLLM and Ollama name it


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Thinking models (llama-server's and vLLM's fields).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    reasoning_format: str | None = None
    reasoning_budget: int | None = Field(None, ge=-1, le=INT32_MAX)
    reasoning_budget_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)
    thinking_budget_tokens: int | None = Field(None, ge=-1, le=INT32_MAX)
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted because they change nothing about the answer: hints and bookkeeping.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused with a clear message when set to something Hearth cannot do.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    refuse_unsupported(request)
    if request.store:
        raise InvalidRequest("Hearth does not store completions; leave store unset or false", param="store")
    if request.modalities and any(m != "text" for m in request.modalities):
        raise InvalidRequest("only the 'text' output modality is supported", param="modalities")
    for name in ("audio", "web_search_options", "verbosity"):
        if getattr(request, name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this model", param=name)
    if request.reasoning_format is not None and request.reasoning_format not in REASONING_FORMATS:
        raise InvalidRequest(f"reasoning_format '{request.reasoning_format}' is not one of auto, none, deepseek",
                             param="reasoning_format")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.tools is not None and request.functions is not None:
        raise InvalidRequest("send either tools or the deprecated functions, not both", param="functions")
    if request.function_call is not None and request.tool_choice is not None:
        raise InvalidRequest("send either tool_choice or the deprecated function_call, not both",
                             param="function_call")
    for index, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, AudioPart | FilePart):
                    kind = "audio" if isinstance(part, AudioPart) else "files"
                    raise CapabilityNotSupported(
                        f"model '{request.model}' does not accept {kind} in chat; text and images are supported",
                        param=f"messages[{index}].content")
                if isinstance(part, ImagePart) and message.role != "user":
                    raise InvalidRequest("images are only allowed in user messages",
                                         param=f"messages[{index}].content")
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(f"messages[{index}] has role 'tool' but no tool_call_id",
                                 param=f"messages[{index}].tool_call_id")


def _message(message: ChatMessage) -> dict[str, Any]:
    item = message.model_dump(exclude_none=True)
    if message.function_call is not None:  # the legacy shape of a call
        item.pop("function_call")
        item["tool_calls"] = [{"id": "", "type": "function", "function": message.function_call.model_dump()}]
    for call in item.get("tool_calls", []):
        arguments = call["function"].get("arguments", "")
        call["function"]["arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return item


def chat_request(request: ChatCompletionRequest) -> ChatRequest:
    """The OpenAI request as Hearth's chat request (after the OpenAI-only checks)."""
    _refuse_unsupported(request)
    legacy = request.functions is not None
    if legacy:
        tools = [f.model_dump(exclude_none=True) for f in request.functions or []]
        choice: Any = request.function_call
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
    else:
        tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
        choice = request.tool_choice
    budget = next((b for b in (request.reasoning_budget_tokens, request.thinking_budget_tokens,
                               request.reasoning_budget) if b is not None), None)
    split = None if request.reasoning_format is None else request.reasoning_format != "none"
    sampling = {name: getattr(request, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repeat_penalty",
        "typical_p", "repeat_last_n", "logit_bias", "stop", "grammar", "speculative_type", "speculative_n_max")}
    return ChatRequest(
        model=request.model, messages=[_message(m) for m in request.messages], tools=tools, tool_choice=choice,
        parallel_tool_calls=request.parallel_tool_calls, legacy_functions=legacy,
        response_format=request.response_format.model_dump(by_alias=True, exclude_none=True)
        if request.response_format else None,
        reasoning=Reasoning(effort=request.reasoning_effort, budget=budget,
                            split=split),
        template_kwargs=dict(request.chat_template_kwargs or {}),
        max_tokens=request.max_completion_tokens or request.max_tokens, n=request.n or 1,
        logprobs=bool(request.logprobs), top_logprobs=request.top_logprobs, ignore_eos=request.ignore_eos,
        params={"tool_choice": "function_call" if legacy else "tool_choice",
                "tools": "functions" if legacy else "tools"}, **sampling)


def _chunk(request_id: str, created: int, model: str, index: int, delta: dict[str, Any],
           finish: str | None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
            "finish_reason": finish,
        }],
    }


def _reasoning_fields(text: str, which: str) -> dict[str, str]:
    return {name: text for name in ("reasoning_content", "reasoning") if which in ("both", name)}


async def chat_completion_events(request: ChatCompletionRequest, engine: Engine) -> AsyncIterator[dict[str, Any]]:
    """The chat completion as OpenAI stream chunks; the first arrives only once generation has begun."""
    chat = chat_request(request)
    which = engine.model(request.model).reasoning.field
    request_id, created = new_id("chatcmpl"), now()
    chat.request_id = request_id
    legacy = chat.legacy_functions

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return _chunk(request_id, created, request.model, index, delta, finish, logprobs)

    event: ChatEvent
    async for event in chat_events(chat, engine):
        if isinstance(event, Started):
            opening = chunk(event.choice, {"role": "assistant", "content": ""})
            if event.prompt is not None:
                opening[PROMPT_KEY] = event.prompt
            yield opening
        elif isinstance(event, TextDelta):
            yield chunk(event.choice, {"content": event.text} if event.text else {}, logprobs=event.logprobs)
        elif isinstance(event, ReasoningDelta):
            yield chunk(event.choice, _reasoning_fields(event.text, which))
        elif isinstance(event, ToolCallStarted):
            if legacy:
                yield chunk(event.choice, {"function_call": {"name": event.name, "arguments": ""}})
            else:
                yield chunk(event.choice, {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                                           "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolArgumentsDelta):
            if legacy:
                yield chunk(event.choice, {"function_call": {"arguments": event.text}})
            else:
                yield chunk(event.choice, {"tool_calls": [{"index": event.index,
                                                           "function": {"arguments": event.text}}]})
        elif isinstance(event, Finished):
            reason = "function_call" if legacy and event.reason == "tool_calls" else event.reason
            final = chunk(event.choice, {}, reason)
            final["timings"] = event.timings
            final[USAGE_KEY] = event.usage
            final[STOP_KEY] = event.stop_sequence
            final[FINISHED_KEY] = event
            yield final


FINISHED_KEY = "_finished"  # the Finished event on a choice's last chunk, for the whole response


def _message_of(event: Finished, legacy: bool, which: str) -> dict[str, Any]:
    message = event.message
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in message.tool_calls]
    result: dict[str, Any] = {"role": "assistant", "content": message.content or None if calls else message.content,
                              "refusal": None}
    if message.reasoning:
        result.update(_reasoning_fields(message.reasoning, which))
    if calls and legacy:
        result["function_call"] = calls[0]["function"]
    elif calls:
        result["tool_calls"] = calls
    return result


async def create_chat_completion(request: ChatCompletionRequest, engine: Engine) -> dict[str, Any]:
    """The whole (non-streaming) chat completion response, from each choice's Finished event."""
    finals: list[dict[str, Any]] = []
    request_id, created = "", 0
    async for chunk in chat_completion_events(request, engine):
        request_id, created = chunk["id"], chunk["created"]
        if FINISHED_KEY in chunk:
            finals.append(chunk)
    finals.sort(key=lambda c: c[FINISHED_KEY].choice)
    which = engine.model(request.model).reasoning.field
    legacy = request.functions is not None
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [{
            "index": c[FINISHED_KEY].choice,
            "message": _message_of(c[FINISHED_KEY], legacy, which),
            "logprobs": {"content": c[FINISHED_KEY].message.logprobs, "refusal": None} if request.logprobs else None,
            "finish_reason": c["choices"][0]["finish_reason"],
        } for c in finals],
        "usage": total_usage(finals),
        "timings": finals[-1]["timings"] if finals else None,
    }


async def count_tokens(request: ChatCompletionRequest, engine: Engine) -> int:
    return await count_prompt_tokens(chat_request(request), engine)


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    return await respond(request, body.stream, body.include_usage(), lambda: chat_completion_events(body, engine),
                         lambda: create_chat_completion(body, engine))
