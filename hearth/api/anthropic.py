"""Anthropic's Messages API over the same models: its request mapped onto `ChatRequest`, chat events encoded as
Anthropic's SSE events or one message.

POST /v1/messages (text, image, tool_use, tool_result and thinking blocks; tools and tool_choice; the `thinking`
switch; SSE events as Anthropic sends them) and POST /v1/messages/count_tokens. Errors are
{"type": "error", "error": {"type", "message"}}, made here (`error_body`) and in-stream as an `error` event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.routing import HearthRoute
from hearth.api.streaming import SSE_HEADERS, primed
from hearth.chat.request import (
    ChatRequest,
    Finished,
    Reasoning,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStarted,
    Usage,
)
from hearth.chat.serving import chat_events, count_prompt_tokens, tool_arguments
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
    thinking: dict[str, Any] | None = None  # {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}


class CountBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


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


def chat_messages(body: MessagesBody | CountBody) -> list[dict[str, Any]]:
    """Anthropic's conversation as chat messages (tool results become `tool` messages)."""
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
        thoughts: list[str] = []
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
            elif kind in ("thinking", "redacted_thinking"):
                thoughts.append(str(block.get("thinking", "")))
            elif kind == "tool_result":
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", "") or "tool",
                                 "content": _text(block.get("content", ""))})
            else:
                raise InvalidRequest(f"{where}.content[{number}]: block type '{kind}' is not supported",
                                     param=f"{where}.content")
        if parts or calls or thoughts:
            item: dict[str, Any] = {"role": role, "content": parts or None}
            if calls:
                item["tool_calls"] = calls
            if thoughts and role == "assistant":
                item["reasoning_content"] = "".join(thoughts)
            messages.append(item)
    return messages


def _tools(body: MessagesBody | CountBody) -> dict[str, Any]:
    if not body.tools:
        return {}
    tools = [{"name": t.get("name", ""), "description": t.get("description", ""),
              "parameters": t.get("input_schema") or {"type": "object"}} for t in body.tools]
    choice: Any = None
    parallel = None
    if body.tool_choice:
        kind = body.tool_choice.get("type")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            choice = {"type": "function", "function": {"name": body.tool_choice.get("name", "")}}
        elif choice is None:
            raise InvalidRequest(f"tool_choice type '{kind}' is not one of auto, any, tool, none", param="tool_choice")
        if body.tool_choice.get("disable_parallel_tool_use"):
            parallel = False
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}


def _reasoning(body: MessagesBody | CountBody) -> Reasoning:
    """Anthropic's `thinking` switch: disabled turns thoughts off, enabled with budget_tokens bounds them."""
    thinking = body.thinking or {}
    kind = thinking.get("type")
    if kind is None:
        return Reasoning()
    if kind == "disabled":
        return Reasoning(effort="none")
    if kind != "enabled":
        raise InvalidRequest(f"thinking.type '{kind}' is not one of enabled, disabled", param="thinking.type")
    budget = thinking.get("budget_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise InvalidRequest("thinking.budget_tokens must be a non-negative integer", param="thinking.budget_tokens")
    return Reasoning(budget=budget)


def _request(body: MessagesBody | CountBody) -> ChatRequest:
    extra: dict[str, Any] = {}
    if isinstance(body, MessagesBody):
        extra = {k: v for k, v in {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                                   "stop": body.stop_sequences, "max_tokens": body.max_tokens}.items()
                 if v is not None}
    return ChatRequest(model=body.model, messages=chat_messages(body), reasoning=_reasoning(body),
                       **_tools(body), **extra)


def _stop_reason(finish: str) -> str:
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish, "end_turn")


async def _events(body: MessagesBody, engine: Engine) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) in Anthropic's order: message_start, blocks, message_delta, message_stop."""
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    block = -1
    block_kind = ""
    calls: dict[int, int] = {}  # call index -> content block index

    def start_block(kind: str, content_block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        nonlocal block, block_kind
        out = []
        if block >= 0:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": block}))
        block, block_kind = block + 1, kind
        out.append(("content_block_start", {"type": "content_block_start", "index": block,
                                            "content_block": content_block}))
        return out

    chat = _request(body)
    chat.request_id = message_id
    async for event in chat_events(chat, engine):
        if isinstance(event, Started):
            yield "message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": _usage(event.prompt) if event.prompt is not None else {"input_tokens": 0,
                                                                                "output_tokens": 0}}}
            yield "ping", {"type": "ping"}
        elif isinstance(event, ReasoningDelta):
            if block_kind != "thinking":
                for item in start_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield item
            yield "content_block_delta", {"type": "content_block_delta", "index": block,
                                          "delta": {"type": "thinking_delta", "thinking": event.text}}
        elif isinstance(event, TextDelta) and event.text:
            if block_kind != "text":
                for item in start_block("text", {"type": "text", "text": ""}):
                    yield item
            yield "content_block_delta", {"type": "content_block_delta", "index": block,
                                          "delta": {"type": "text_delta", "text": event.text}}
        elif isinstance(event, ToolCallStarted):
            for item in start_block("tool_use", {"type": "tool_use", "id": event.id.replace("call_", "toolu_"),
                                                 "name": event.name, "input": {}}):
                yield item
            calls[event.index] = block
        elif isinstance(event, ToolArgumentsDelta):
            yield "content_block_delta", {"type": "content_block_delta", "index": calls[event.index],
                                          "delta": {"type": "input_json_delta", "partial_json": event.text}}
        elif isinstance(event, Finished):
            if block >= 0:
                yield "content_block_stop", {"type": "content_block_stop", "index": block}
            stop = event.stop_sequence or None
            reason = "stop_sequence" if stop and event.reason == "stop" else _stop_reason(event.reason)
            yield "message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reason, "stop_sequence": stop if reason == "stop_sequence"
                                              else None},
                                    "usage": _usage(event.usage)}
            yield "message_stop", {"type": "message_stop", FINISHED: event}


FINISHED = "_finished"  # the Finished event on message_stop inside this module, for the whole message


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` counts the prompt tokens computed, those the model's cache already held are
    `cache_read_input_tokens` (the prompt is their sum), as llama-server reports them. Hearth caches every prompt on
    its own, so nothing is ever a `cache_creation_input_tokens` of a `cache_control` breakpoint."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens, "output_tokens": usage.completion_tokens}


async def _whole(body: MessagesBody, engine: Engine) -> dict[str, Any]:
    message: dict[str, Any] = {}
    async for name, data in _events(body, engine):
        if name == "message_start":
            message = data["message"]
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = data["usage"]
        elif name == "message_stop":
            finished: Finished = data[FINISHED]
            content: list[dict[str, Any]] = []
            if finished.message.reasoning:
                content.append({"type": "thinking", "thinking": finished.message.reasoning, "signature": ""})
            if finished.message.content:
                content.append({"type": "text", "text": finished.message.content})
            content += [{"type": "tool_use", "id": c.id.replace("call_", "toolu_"), "name": c.name,
                         "input": tool_arguments(c.arguments)} for c in finished.message.tool_calls]
            message["content"] = content
    return message


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/messages")
async def messages(body: MessagesBody, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    if not body.stream:
        return await _whole(body, engine)
    events = await primed(_events(body, engine))  # errors before the first event stay HTTP errors

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for name, data in events:
                data = {k: v for k, v in data.items() if k != FINISHED}
                yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        except HearthError as exc:
            yield f"event: error\ndata: {json.dumps(error_body(exc.status, exc.message))}\n\n".encode()

    return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountBody, request: Request) -> dict[str, int]:
    return {"input_tokens": await count_prompt_tokens(_request(body), request.app.state.engine)}

