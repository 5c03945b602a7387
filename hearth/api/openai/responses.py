"""OpenAI's Responses API over the same models: its request mapped onto `ChatRequest`, chat events encoded as
Responses events (reasoning items with `response.reasoning_text.delta`, messages, function calls).

POST /v1/responses (string or item input with input_text / input_image, instructions, function tools, text.format,
reasoning.effort, streaming events with sequence numbers, previous_response_id), GET and DELETE /v1/responses/{id}. Responses are
kept in memory for `responses_ttl_minutes` so a conversation can continue from one, the oldest forgotten first
beyond `responses_max_stored` of them or `responses_max_bytes` of conversation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.openai.common import SamplingRequest, refuse_unknown
from hearth.api.routing import HearthRoute
from hearth.api.streaming import SSE_HEADERS, primed
from hearth.chat.request import (
    ChatRequest,
    Finished,
    Reasoning,
    ReasoningDelta,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStarted,
)
from hearth.chat.serving import chat_events
from hearth.engine import Engine
from hearth.errors import HearthError, InvalidRequest, NotFound

log = logging.getLogger("hearth.api.responses")


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": "none" | "minimal" | "low" | "medium" | "high"}


@dataclass
class Stored:
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the whole conversation as chat messages, output included
    at: float
    size: int = 0  # bytes of the conversation as JSON, for the store's limit


def _store(request: Request) -> dict[str, Stored]:
    state = request.app.state
    if not hasattr(state, "responses"):
        state.responses = {}
    ttl = request.app.state.engine.settings.responses_ttl_minutes * 60
    now = time.time()
    for key in [k for k, v in state.responses.items() if now - v.at > ttl]:
        del state.responses[key]
    return state.responses


def _trim(store: dict[str, Stored], most: int, most_bytes: int) -> None:
    """Forget the oldest stored responses beyond `most` of them or `most_bytes` of conversation: each keeps its
    whole conversation, so a long chain of continued responses holds every earlier turn many times over."""
    total = sum(item.size for item in store.values())
    while store and (len(store) > most or total > most_bytes):
        oldest = next(iter(store))
        total -= store.pop(oldest).size


def _content(parts: Any, where: str) -> Any:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise InvalidRequest(f"{where} must be a string or a list of parts", param=where)
    out = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            url = part.get("image_url") or ""
            if not url:
                raise InvalidRequest(f"{where}[{number}]: input_image needs an image_url", param=where)
            out.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail")}})
        else:
            raise InvalidRequest(f"{where}[{number}]: content type '{kind}' is not supported", param=where)
    return out


def chat_messages(body: ResponsesBody) -> list[dict[str, Any]]:
    """The new input as chat messages (function calls and their outputs included)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(body.input):
        kind = item.get("type", "message")
        where = f"input[{index}]"
        if kind == "message":
            role = item.get("role", "user")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}.role '{role}' is not supported", param=f"{where}.role")
            messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": item.get("call_id", ""), "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}]})
        elif kind == "reasoning":  # an earlier turn's thoughts, given back
            text = "".join(str(p.get("text", "")) for p in item.get("content") or item.get("summary") or []
                           if isinstance(p, dict))
            messages.append({"role": "assistant", "content": None, "reasoning_content": text})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", "") or "call",
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequest(f"{where}: item type '{kind}' is not supported", param=where)
    return messages


def _chat_request(body: ResponsesBody, messages: list[dict[str, Any]]) -> ChatRequest:
    extra: dict[str, Any] = {}
    if body.tools:
        tools = []
        for index, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidRequest(f"tools[{index}]: only function tools are supported, not '{tool.get('type')}'",
                                     param=f"tools[{index}].type")
            tools.append({k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool})
        extra["tools"] = tools
        choice = body.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name", "")}}
        extra["tool_choice"] = choice
    if body.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = (body.text or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        extra["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    elif fmt and fmt.get("type") in ("json_object", "text"):
        extra["response_format"] = {"type": fmt["type"]}
    elif fmt:
        raise InvalidRequest(f"text.format type '{fmt.get('type')}' is not supported", param="text.format")
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            extra[name] = getattr(body, name)
    if body.max_output_tokens:
        extra["max_tokens"] = body.max_output_tokens
    SamplingRequest(model=body.model, **{k: extra[k] for k in ("temperature", "top_p") if k in extra})
    effort = (body.reasoning or {}).get("effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high"):
        raise InvalidRequest(f"reasoning.effort '{effort}' is not one of none, minimal, low, medium, high",
                             param="reasoning.effort")
    return ChatRequest(model=body.model, messages=_merge_thoughts(messages), reasoning=Reasoning(effort=effort),
                       params={"response_format": "text.format"}, **extra)


def _merge_thoughts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reasoning item given back goes with the assistant turn that follows it, as templates expect."""
    out: list[dict[str, Any]] = []
    for message in messages:
        previous = out[-1] if out else None
        if previous is not None and previous["role"] == "assistant" and set(previous) == {"role", "content",
                                                                                        "reasoning_content"} \
                and previous["content"] is None and message["role"] == "assistant":
            out[-1] = {**message, "reasoning_content": previous["reasoning_content"]}
        else:
            out.append(message)
    return out


def _shell(response_id: str, body: ResponsesBody, status: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
            "model": body.model, "output": [], "instructions": body.instructions,
            "previous_response_id": body.previous_response_id, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p, "text": body.text or {"format": {"type": "text"}},
            "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {}, "usage": None,
            "error": None, "incomplete_details": None, "store": body.store}


async def _events(body: ResponsesBody, request: Request) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    engine: Engine = request.app.state.engine
    store = _store(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise NotFound(f"no stored response '{body.previous_response_id}' (responses are kept for a limited "
                           f"time)", param="previous_response_id")
        history = [m for m in previous.messages if m["role"] != "system"]
    new = chat_messages(body)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = system + history + new
    response_id = f"resp_{uuid.uuid4().hex}"
    chat = _chat_request(body, messages)
    chat.request_id = response_id
    # Generation has begun before the response is announced: an error before it stays an HTTP error.
    events = await primed(chat_events(chat, engine))
    response = _shell(response_id, body, "in_progress")
    yield "response.created", {"response": dict(response)}
    yield "response.in_progress", {"response": dict(response)}
    text_item: dict[str, Any] | None = None
    thought_item: dict[str, Any] | None = None
    calls: dict[int, dict[str, Any]] = {}
    outputs: list[dict[str, Any]] = []

    def add(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        outputs.append(item)
        return "response.output_item.added", {"output_index": len(outputs) - 1, "item": dict(item)}

    try:
        async for event in events:
            if isinstance(event, ReasoningDelta):
                if thought_item is None:
                    thought_item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "summary": [],
                                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
                    yield add(thought_item)
                yield "response.reasoning_text.delta", {"item_id": thought_item["id"],
                                                        "output_index": outputs.index(thought_item), "content_index": 0,
                                                        "delta": event.text}
            elif isinstance(event, TextDelta) and event.text:
                if text_item is None:
                    text_item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": "in_progress",
                                 "role": "assistant", "content": []}
                    yield add(text_item)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    text_item["content"].append(part)
                    yield "response.content_part.added", {"item_id": text_item["id"], "output_index": len(outputs) - 1,
                                                          "content_index": 0, "part": dict(part)}
                yield "response.output_text.delta", {"item_id": text_item["id"], "output_index": outputs.index(text_item),
                                                     "content_index": 0, "delta": event.text}
            elif isinstance(event, ToolCallStarted):
                item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": event.id,
                        "name": event.name, "arguments": "", "status": "in_progress"}
                calls[event.index] = item
                yield add(item)
            elif isinstance(event, ToolArgumentsDelta):
                item = calls[event.index]
                yield "response.function_call_arguments.delta", {"item_id": item["id"], "output_index": outputs.index(item),
                                                                 "delta": event.text}
            elif isinstance(event, Finished):
                said = event.message
                usage = event.usage
                # The whole answer, as read once at the end, is what the done events and the stored response hold.
                if thought_item is not None:
                    thought_item["content"][0]["text"] = said.reasoning
                if text_item is not None:
                    text_item["content"][0]["text"] = said.content
                for index, call in enumerate(said.tool_calls):
                    if index in calls:
                        calls[index]["arguments"] = call.arguments
                for index, item in enumerate(outputs):
                    item["status"] = "completed"
                    if item["type"] == "message":
                        text = item["content"][0]["text"]
                        yield "response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                            "content_index": 0, "text": text}
                        yield "response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                             "content_index": 0, "part": item["content"][0]}
                    elif item["type"] == "reasoning":
                        yield "response.reasoning_text.done", {"item_id": item["id"], "output_index": index,
                                                               "content_index": 0, "text": item["content"][0]["text"]}
                    else:
                        yield "response.function_call_arguments.done", {"item_id": item["id"], "output_index": index,
                                                                        "arguments": item["arguments"]}
                    yield "response.output_item.done", {"output_index": index, "item": item}
                incomplete = event.reason == "length"
                response.update(
                    status="incomplete" if incomplete else "completed", output=outputs,
                    incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                    usage={"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                           "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                           "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                           "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}})
                if body.store:
                    turn: dict[str, Any] = {"role": "assistant", "content": said.content or None}
                    if said.reasoning:
                        turn["reasoning_content"] = said.reasoning
                    if said.tool_calls:
                        turn["tool_calls"] = [{"id": c.id, "type": "function",
                                               "function": {"name": c.name, "arguments": c.arguments}}
                                              for c in said.tool_calls]
                    kept = [*messages, turn]
                    size = len(json.dumps(kept)) + len(json.dumps(response))
                    if size <= engine.settings.responses_max_bytes:  # larger than the whole budget: not kept at all
                        store[response_id] = Stored(response=response, messages=kept, at=time.time(), size=size)
                        _trim(store, engine.settings.responses_max_stored, engine.settings.responses_max_bytes)
                    else:
                        log.warning("response %s not stored: its conversation (%d bytes) is larger than "
                                    "responses_max_bytes", response_id, size)
                yield ("response.incomplete" if incomplete else "response.completed"), {"response": response}

    finally:
        await events.aclose()  # the client went away: generation stops


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/responses")
@router.post("/responses", include_in_schema=False)
async def create(body: ResponsesBody, request: Request) -> Any:
    refuse_unknown(body)
    if not body.stream:
        final: dict[str, Any] = {}
        async for name, data in _events(body, request):
            if name in ("response.completed", "response.incomplete"):
                final = data["response"]
        return final
    events = await primed(_events(body, request))  # errors before the first event stay HTTP errors

    async def sse() -> AsyncIterator[bytes]:
        sequence = 0
        try:
            async for name, data in events:
                payload = {"type": name, "sequence_number": sequence, **data}
                sequence += 1
                yield f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
        except HearthError as exc:
            payload = {"type": "error", "sequence_number": sequence, "code": exc.code, "message": exc.message,
                       "param": exc.param}
            yield f"event: error\ndata: {json.dumps(payload)}\n\n".encode()

    return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/responses/{response_id}")
async def get(response_id: str, request: Request) -> dict[str, Any]:
    stored = _store(request).get(response_id)
    if stored is None:
        raise NotFound(f"no stored response '{response_id}'")
    return stored.response


@router.delete("/v1/responses/{response_id}")
async def delete(response_id: str, request: Request) -> dict[str, Any]:
    if _store(request).pop(response_id, None) is None:
        raise NotFound(f"no stored response '{response_id}'")
    return {"id": response_id, "object": "response", "deleted": True}
