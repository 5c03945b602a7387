"""What OpenAI's chat and completions endpoints share: the sampling fields, usage and timings in OpenAI's shapes,
and the stream-or-whole response (how sampling reaches the runner is `hearth.generation`)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from hearth.api.streaming import primed, sse_response, until_disconnect
from hearth.errors import InvalidRequest
from hearth.generation import INT32_MAX
from hearth.runner import hearth_pb2 as pb


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields OpenAI (and llama.cpp's server) accept on both chat and completions; unknown ones are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions llama.cpp's server and LocalAI accept, honoured here too.
    ignore_eos: bool = False  # generate max_tokens whatever the model says
    typical_p: float | None = Field(None, gt=0, le=1)
    repeat_last_n: int | None = Field(None, ge=0, le=INT32_MAX)
    grammar: str | None = None  # a GBNF grammar (llama.cpp's format, root rule "root")
    # llama-server's per-request speculative decoding: "none" or a kind (hearth/config/speculation.py), and a cap
    # on the tokens guessed at a time (0: none).
    speculative_type: Literal["none", "ngram-simple", "draft-simple"] | None = Field(None, alias="speculative.type")
    speculative_n_max: int | None = Field(None, ge=0, le=64, alias="speculative.n_max")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def refuse_unknown(request: BaseModel) -> None:
    """Every parameter is honoured or refused: unknown ones are a 400 naming them, as OpenAI answers."""
    for name in request.model_extra or {}:
        raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)


async def read_form(request: Request, known: set[str], needs: str) -> Any:
    """A multipart form whose fields are all known; a 400 naming the first unknown one, or when it is no form."""
    try:
        form = await request.form()
    except HTTPException:
        raise  # the body limit's 413, met while reading the form
    except Exception as exc:  # malformed multipart bodies raise several types
        raise InvalidRequest(f"the request must be multipart/form-data with {needs}: {exc}") from None
    for key in form:
        if key not in known:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
    return form


def refuse_unsupported(request: SamplingRequest) -> None:
    refuse_unknown(request)
    if request.grammar is not None and not request.grammar.strip():
        raise InvalidRequest("grammar must not be empty", param="grammar")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")


def only_completion(usage: pb.Usage) -> pb.Usage:
    """Usage of a further choice of the same prompt: the prompt is counted once, with the first choice."""
    return pb.Usage(completion_tokens=usage.completion_tokens)


def usage_dict(usage: Any) -> dict[str, Any]:
    """OpenAI's usage from a runner's pb.Usage or a chat Usage (which also counts thought tokens)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": getattr(usage, "reasoning_tokens", 0)},
    }


USAGE_KEY = "_usage"  # the pb.Usage a choice's last chunk carries inside the serving layer
PROMPT_KEY = "_prompt"  # the pb.Usage of the prompt alone, on a choice's first chunk when the backend counts it early
STOP_KEY = "_stop_sequence"  # and the stop string that ended it, if one did (for Anthropic's stop_reason)


def total_usage(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Usage summed over the last chunk of every choice."""
    from hearth.chat.request import Usage

    total = Usage()
    for chunk in finals:
        more = chunk[USAGE_KEY]
        total.add(Usage(more.prompt_tokens, more.completion_tokens, more.cached_tokens,
                        getattr(more, "reasoning_tokens", 0)))
    return usage_dict(total)


async def public_stream(events: AsyncIterator[dict[str, Any]], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """Chunks as OpenAI streams them: with include_usage, `usage: null` on each and a last usage-only chunk."""
    finals = []
    last = None
    async with contextlib.aclosing(events):
        async for chunk in events:
            if USAGE_KEY in chunk:
                finals.append(chunk)
            if any(key.startswith("_") for key in chunk):  # the serving layer's own keys (USAGE_KEY, …)
                chunk = {key: value for key, value in chunk.items() if not key.startswith("_")}
            if include_usage:
                chunk["usage"] = None
            last = chunk
            yield chunk
    if include_usage and last is not None:
        yield {**last, "choices": [], "usage": total_usage(finals)}


async def respond(
    request: Request,
    stream: bool,
    include_usage: bool,
    events: Callable[[], AsyncIterator[dict[str, Any]]],
    whole: Callable[[], Awaitable[dict[str, Any]]],
) -> Any:
    """The route's whole job: SSE for streams (errors before the first event stay HTTP errors), else JSON."""
    if stream:
        return sse_response(await primed(public_stream(events(), include_usage)))
    return await until_disconnect(request, whole())
