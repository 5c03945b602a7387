"""Anthropic's Messages API over the same models: a thin adapter onto the OpenAI chat serving code.

POST /v1/messages (text, image, tool_use and tool_result blocks; tools and tool_choice; SSE events as Anthropic
sends them) and POST /v1/messages/count_tokens. Errors are {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.openai.chat import ChatCompletionRequest, chat_completion_events, count_prompt_tokens
from hearth.api.openai.common import PROMPT_KEY, STOP_KEY, USAGE_KEY
from hearth.api.streaming import SSE_HEADERS, primed
from hearth.chat.tools import arguments_mapping
from hearth.engine import Engine
from hearth.errors import HearthError, InvalidRequest

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class MessagesBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class CountBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of blocks", param="messages")
    return "".join(str(block.get("text", "")) for block in content
                   if isinstance(block, dict) and block.get("type") == "text")


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type', 'image/png')};base64,"
                                                          f"{source.get('data', '')}"}}
    if source.get("type") == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url", "")}}
    raise InvalidRequest(f"{where}: image source must be base64 or url", param=where)


def openai_messages(body: MessagesBody | CountBody) -> list[dict[str, Any]]:
    """Anthropic's conversation as OpenAI chat messages (tool results become `tool` messages)."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for index, message in enumerate(body.messages):
        role, content = message.get("role"), message.get("content")
        where = f"messages[{index}]"
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"{where}.role must be 'user' or 'assistant'", param=f"{where}.role")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"{where}.content must be a string or a list of blocks", param=f"{where}.content")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for number, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                parts.append(_image(block, f"{where}.content[{number}]"))
            elif kind == "tool_use":
                calls.append({"id": block.get("id", ""), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result":
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", "") or "tool",
                                 "content": _text(block.get("content", ""))})
            else:
                raise InvalidRequest(f"{where}.content[{number}]: block type '{kind}' is not supported",
                                     param=f"{where}.content")
        if parts or calls:
            item: dict[str, Any] = {"role": role, "content": parts or None}
            if calls:
                item["tool_calls"] = calls
            messages.append(item)
    return messages


def _tools(body: MessagesBody | CountBody) -> dict[str, Any]:
    if not body.tools:
        return {}
    tools = [{"type": "function", "function": {"name": t.get("name", ""), "description": t.get("description", ""),
                                                "parameters": t.get("input_schema") or {"type": "object"}}}
             for t in body.tools]
    choice: Any = None
    if body.tool_choice:
        kind = body.tool_choice.get("type")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            choice = {"type": "function", "function": {"name": body.tool_choice.get("name", "")}}
        elif choice is None:
            raise InvalidRequest(f"tool_choice type '{kind}' is not one of auto, any, tool, none", param="tool_choice")
        if body.tool_choice.get("disable_parallel_tool_use"):
            return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": False}
    return {"tools": tools, "tool_choice": choice}


def _request(body: MessagesBody) -> ChatCompletionRequest:
    extra = {k: v for k, v in {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                               "stop": body.stop_sequences}.items() if v is not None}
    return ChatCompletionRequest(model=body.model, messages=openai_messages(body), max_tokens=body.max_tokens,
                                 **_tools(body), **extra)


def _stop_reason(finish: str) -> str:
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish, "end_turn")


async def _events(body: MessagesBody, engine: Engine) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) in Anthropic's order: message_start, blocks, message_delta, message_stop."""
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    started = False
    block = -1
    block_kind = ""
    calls: dict[int, int] = {}  # OpenAI call index -> content block index
    async for chunk in chat_completion_events(_request(body), engine):
        if not started:
            started = True
            prompt = chunk.get(PROMPT_KEY)  # the prompt as counted when its first token came, when the model says
            yield "message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": _usage(prompt) if prompt is not None else {"input_tokens": 0, "output_tokens": 0}}}
            yield "ping", {"type": "ping"}
        choice = chunk["choices"][0]
        delta = choice["delta"]
        if delta.get("content"):
            if block_kind != "text":
                if block >= 0:
                    yield "content_block_stop", {"type": "content_block_stop", "index": block}
                block, block_kind = block + 1, "text"
                yield "content_block_start", {"type": "content_block_start", "index": block,
                                              "content_block": {"type": "text", "text": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": block,
                                          "delta": {"type": "text_delta", "text": delta["content"]}}
        for call in delta.get("tool_calls", []):
            if "id" in call:
                if block >= 0:
                    yield "content_block_stop", {"type": "content_block_stop", "index": block}
                block, block_kind = block + 1, "tool_use"
                calls[call["index"]] = block
                yield "content_block_start", {"type": "content_block_start", "index": block, "content_block": {
                    "type": "tool_use", "id": call["id"].replace("call_", "toolu_"),
                    "name": call["function"]["name"], "input": {}}}
            if call["function"].get("arguments"):
                yield "content_block_delta", {"type": "content_block_delta", "index": calls[call["index"]],
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": call["function"]["arguments"]}}
        if choice["finish_reason"]:
            if block >= 0:
                yield "content_block_stop", {"type": "content_block_stop", "index": block}
            usage = chunk[USAGE_KEY]
            stop = chunk.get(STOP_KEY) or None
            reason = "stop_sequence" if stop and choice["finish_reason"] == "stop" else \
                _stop_reason(choice["finish_reason"])
            yield "message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reason, "stop_sequence": stop if reason == "stop_sequence"
                                              else None},
                                    "usage": _usage(usage)}
            yield "message_stop", {"type": "message_stop"}


def _usage(usage: Any) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` counts the prompt tokens computed, those the model's cache already held are
    `cache_read_input_tokens` (the prompt is their sum), as llama-server reports them. Hearth caches every prompt on
    its own, so nothing is ever a `cache_creation_input_tokens` of a `cache_control` breakpoint."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens, "output_tokens": usage.completion_tokens}


async def _whole(body: MessagesBody, engine: Engine) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    message: dict[str, Any] = {}
    inputs: dict[int, str] = {}
    async for name, data in _events(body, engine):
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            content.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta":
                content[data["index"]]["text"] += delta["text"]
            else:
                inputs[data["index"]] = inputs.get(data["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = data["usage"]
    for index, text in inputs.items():
        content[index]["input"] = arguments_mapping(text)
    message["content"] = content
    return message


router = APIRouter()


@router.post("/v1/messages")
async def messages(body: MessagesBody, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    if not body.stream:
        return await _whole(body, engine)
    events = await primed(_events(body, engine))  # errors before the first event stay HTTP errors

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for name, data in events:
                yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        except HearthError as exc:
            yield f"event: error\ndata: {json.dumps(error_body(exc.status, exc.message))}\n\n".encode()

    return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountBody, request: Request) -> dict[str, int]:
    chat = ChatCompletionRequest(model=body.model, messages=openai_messages(body), **_tools(body))
    return {"input_tokens": await count_prompt_tokens(chat, request.app.state.engine)}

