"""POST /v1/completions: request model, serving logic, route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from hearth.api.openai.common import (
    USAGE_KEY,
    SamplingRequest,
    new_id,
    now,
    only_completion,
    refuse_unsupported,
    respond,
    total_usage,
)
from hearth.api.routing import HearthRoute
from hearth.engine import Engine
from hearth.errors import InvalidRequest
from hearth.generation import INT32_MAX, merge, sampling_params, stop_list, timings_dict, with_seed
from hearth.runner import hearth_pb2 as pb

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)


def _prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompt field as a list of prompts, each text or token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompts: list[str | list[int]] = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = []
        for index, item in enumerate(prompt):
            if isinstance(item, list) and not item:
                raise InvalidRequest(f"prompt[{index}] is an empty token list", param="prompt")
            prompts.append(item)  # type: ignore[arg-type]
    for item in prompts:
        if isinstance(item, list) and any(not 0 <= token <= INT32_MAX for token in item):
            raise InvalidRequest("prompt token ids must be between 0 and 2147483647", param="prompt")
    return prompts


def _refuse_unsupported(request: CompletionRequest) -> None:
    refuse_unsupported(request)
    if request.logprobs is not None and request.echo:
        raise InvalidRequest("logprobs together with echo is not supported: Hearth does not score prompt tokens",
                             param="logprobs")
    if request.best_of is not None and request.best_of > 1:
        raise InvalidRequest("best_of > 1 is not supported; use n to get several completions", param="best_of")


def _chunk(request_id: str, created: int, model: str, index: int, text: str, finish: str | None,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}],
    }


def _legacy_logprobs(entries: Any, offset: int, top: int) -> tuple[dict[str, Any], int]:
    """Runner logprobs in the legacy completions shape; text offsets continue from `offset`."""
    result: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if top else None,
                              "text_offset": []}
    for entry in entries:
        result["tokens"].append(entry.text)
        result["token_logprobs"].append(entry.logprob)
        if top:
            result["top_logprobs"].append({alt.text: alt.logprob for alt in entry.top})
        result["text_offset"].append(offset)
        offset += len(entry.text)
    return result, offset


async def completion_events(request: CompletionRequest, engine: Engine) -> AsyncIterator[dict[str, Any]]:
    """Completion chunks for every prompt, generated concurrently and interleaved; each carries its index."""
    _refuse_unsupported(request)
    prompts = _prompts(request)
    config = engine.model(request.model)
    stops = stop_list(request, config)
    sampling = sampling_params(request, config)
    if request.grammar:
        if request.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a grammar", param="ignore_eos")
        sampling.grammar = request.grammar
    max_tokens = request.max_tokens or config.parameters.max_tokens or DEFAULT_MAX_TOKENS
    request_id, created = new_id("cmpl"), now()
    # Of several replicas, a prompt goes back to one that read a prompt with the same start (in 256-character parts).
    first = prompts[0] if prompts and isinstance(prompts[0], str) else ""
    affinity = [first[i:i + 256] for i in range(0, len(first), 256)] if config.replicated else None

    async with engine.runner(config, "generate", affinity) as runner:

        def generate_request(prompt: str | list[int], choice: int) -> pb.GenerateRequest:
            message = pb.GenerateRequest(add_special=True, parse_special=False, max_tokens=max_tokens, stop=stops,
                                         sampling=with_seed(sampling, choice), request_id=request_id,
                                         ignore_eos=request.ignore_eos, logprobs=request.logprobs is not None,
                                         top_logprobs=request.logprobs or 0)
            if isinstance(prompt, str):
                message.prompt = prompt
            else:
                message.prompt_tokens.extend(prompt)
            if request.suffix is not None:
                message.suffix = request.suffix
            return message

        async def one(index: int, prompt: str | list[int], choice: int) -> AsyncIterator[dict[str, Any]]:
            offset = 0
            if request.echo:
                echoed = prompt if isinstance(prompt, str) else await runner.call("detokenize", prompt)
                yield _chunk(request_id, created, request.model, index, echoed, None)
            async for reply in runner.generate(generate_request(prompt, choice)):
                logprobs = None
                if request.logprobs is not None and reply.logprobs:
                    logprobs, offset = _legacy_logprobs(reply.logprobs, offset, request.logprobs)
                if reply.text or logprobs:
                    yield _chunk(request_id, created, request.model, index, reply.text, None, logprobs)
                if reply.finish_reason:
                    final = _chunk(request_id, created, request.model, index, "", reply.finish_reason)
                    final["timings"] = timings_dict(reply.timings)
                    final[USAGE_KEY] = reply.usage if choice == 0 else only_completion(reply.usage)
                    yield final

        n = request.n or 1
        streams = [one(p * n + c, prompt, c) for p, prompt in enumerate(prompts) for c in range(n)]
        if len(streams) == 1:
            async for chunk in streams[0]:
                yield chunk
            return
        async for chunk in merge(streams):
            yield chunk


async def create_completion(request: CompletionRequest, engine: Engine) -> dict[str, Any]:
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    logprobs: dict[int, dict[str, Any]] = {}
    finals: list[dict[str, Any]] = []
    request_id, created = "", 0
    async for chunk in completion_events(request, engine):
        request_id, created = chunk["id"], chunk["created"]
        choice = chunk["choices"][0]
        texts.setdefault(choice["index"], []).append(choice["text"])
        if request.logprobs is not None:
            whole = logprobs.setdefault(choice["index"], {"tokens": [], "token_logprobs": [],
                                                          "top_logprobs": [] if request.logprobs else None,
                                                          "text_offset": []})
            for key, values in (choice["logprobs"] or {}).items():
                if values is not None:
                    whole[key].extend(values)
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
            finals.append(chunk)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": request.model,
        "choices": [
            {"text": "".join(texts[i]), "index": i, "logprobs": logprobs.get(i), "finish_reason": finishes.get(i, "stop")}
            for i in sorted(texts)
        ],
        "usage": total_usage(finals),
        "timings": finals[-1]["timings"] if finals else None,
    }


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)
async def completions(body: CompletionRequest, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    return await respond(request, body.stream, body.include_usage(), lambda: completion_events(body, engine),
                         lambda: create_completion(body, engine))
