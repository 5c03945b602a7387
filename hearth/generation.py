"""From a request's sampling fields and the model YAML to the runner's SamplingParams, and several choices'
streams merged into one: what chat and completions share below the API layer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from hearth.config.schema import ModelConfig
from hearth.errors import InvalidRequest
from hearth.runner import hearth_pb2 as pb

MAX_STOP_SEQUENCES = 4
INT32_MAX = 2**31 - 1  # token ids and counts travel to the runner as int32
T = TypeVar("T")


class Sampling(Protocol):
    """What sampling reads from a request (OpenAI's SamplingRequest and the chat layer's ChatRequest have it)."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repeat_penalty: float | None
    typical_p: float | None
    repeat_last_n: int | None
    logit_bias: dict[str, float] | None
    stop: str | list[str] | None


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Interleave several streams as their items arrive; an error in one ends them all."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for item in stream:
                await queue.put(("item", item))
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            await queue.put(("error", exc))
            return
        await queue.put(("done", None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    remaining = len(tasks)
    try:
        while remaining:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "done":
                remaining -= 1
            else:
                raise value
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def stop_list(request: Sampling, config: ModelConfig) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}",
                             param="stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop sequences must not be empty", param="stop")
    return stops + [s for s in config.stopwords if s and s not in stops]


def _logit_bias(request: Sampling) -> dict[int, float]:
    biases: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got '{key}'", param="logit_bias") from None
        if not 0 <= token <= INT32_MAX:
            raise InvalidRequest(f"logit_bias token id {token} is out of range", param="logit_bias")
        if not -100 <= value <= 100:
            raise InvalidRequest(f"logit_bias values must be between -100 and 100, got {value}",
                                 param="logit_bias")
        biases[token] = value
    return biases


def sampling_params(request: Sampling, config: ModelConfig) -> pb.SamplingParams:
    """Request values beat the model YAML's `parameters`, which beat the backend's defaults."""
    defaults = config.parameters
    params = pb.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "typical_p", "repeat_last_n"):
        value = getattr(request, name)
        if value is None:
            value = getattr(defaults, name, None)
        if value is not None:
            setattr(params, name, value)
    seed = request.seed if request.seed is not None else defaults.seed
    if seed is not None and seed >= 0:
        params.seed = seed & 0xFFFFFFFF
    for token, bias in _logit_bias(request).items():
        params.logit_bias[token] = bias
    speculative_type, speculative_n_max = (getattr(request, "speculative_type", None),
                                           getattr(request, "speculative_n_max", None))
    if speculative_type is not None:
        params.speculative_type = speculative_type
    if speculative_n_max is not None:
        params.speculative_n_max = speculative_n_max
    return params


def with_seed(params: pb.SamplingParams, offset: int) -> pb.SamplingParams:
    """The sampling of choice `offset` of n: a given seed moves on by one per choice, so choices differ but repeat."""
    if offset == 0 or not params.HasField("seed"):
        return params
    copy = pb.SamplingParams()
    copy.CopyFrom(params)
    copy.seed = (params.seed + offset) & 0xFFFFFFFF
    return copy


def timings_dict(timings: pb.Timings) -> dict[str, Any]:
    """The prompt and generation speed, in llama-server's `timings` shape."""
    def per_second(n: int, ms: float) -> float:
        return round(n / (ms / 1000), 2) if ms > 0 else 0.0

    found = {
        "prompt_n": timings.prompt_n,
        "prompt_ms": round(timings.prompt_ms, 3),
        "prompt_per_second": per_second(timings.prompt_n, timings.prompt_ms),
        "predicted_n": timings.predicted_n,
        "predicted_ms": round(timings.predicted_ms, 3),
        "predicted_per_second": per_second(timings.predicted_n, timings.predicted_ms),
    }
    if timings.draft_n:  # as llama-server: only when the model guessed (speculative decoding)
        found.update(draft_n=timings.draft_n, draft_n_accepted=timings.draft_n_accepted)
    return found
