"""POST /v1/embeddings (OpenAI), POST /v1/rerank (Jina/Cohere, as LocalAI serves it), and tokenization."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.openai.common import INT32_MAX, refuse_unknown
from hearth.api.routing import HearthRoute
from hearth.api.streaming import until_disconnect
from hearth.engine import Engine
from hearth.errors import InvalidRequest
from hearth.runner import hearth_pb2 as pb

MAX_INPUTS = 2048  # as OpenAI


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    user: str | None = None


def _inputs(request: EmbeddingRequest) -> list[pb.EmbedInput]:
    given = request.input
    if isinstance(given, str):
        items: list[Any] = [given]
    elif given and all(isinstance(x, int) for x in given):
        items = [given]
    else:
        items = list(given)
    if not items:
        raise InvalidRequest("input must not be an empty list", param="input")
    if len(items) > MAX_INPUTS:
        raise InvalidRequest(f"at most {MAX_INPUTS} inputs are allowed in one request, got {len(items)}",
                             param="input")
    inputs = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input {index} is an empty string", param="input")
            inputs.append(pb.EmbedInput(text=item))
        else:
            if not item:
                raise InvalidRequest(f"input {index} is an empty token list", param="input")
            if any(not 0 <= token <= INT32_MAX for token in item):
                raise InvalidRequest("token ids must be between 0 and 2147483647", param="input")
            inputs.append(pb.EmbedInput(tokens=item))
    return inputs


def _shorten(values: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` values, normalised again to unit length."""
    kept = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in kept)) or 1.0
    return [v / norm for v in kept]


def _encode(values: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


async def create_embeddings(request: EmbeddingRequest, engine: Engine) -> dict[str, Any]:
    refuse_unknown(request)
    inputs = _inputs(request)
    config = engine.model(request.model)
    if request.dimensions is not None and not config.reduce_dimensions:
        raise InvalidRequest(f"model '{request.model}' does not allow changing 'dimensions'; its YAML can allow it "
                             f"with 'reduce_dimensions: true' (for models trained for it)", param="dimensions")
    async with engine.runner(config, "embed") as runner:
        size = runner.info.embedding_size if runner.info else 0
        if request.dimensions is not None and size and request.dimensions > size:
            raise InvalidRequest(f"dimensions must be at most {size} for model '{request.model}'",
                                 param="dimensions")
        reply: pb.EmbedReply = await runner.call(
            "embed", pb.EmbedRequest(inputs=inputs, truncate=config.truncate, normalize=True))
    data = []
    for index, embedding in enumerate(reply.embeddings):
        values = list(embedding.values)
        if request.dimensions is not None:
            values = _shorten(values, request.dimensions)
        data.append({"object": "embedding", "index": index, "embedding": _encode(values, request.encoding_format)})
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
    }


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=MAX_INPUTS)
    top_n: int | None = None
    return_documents: bool = True


async def rerank(request: RerankRequest, engine: Engine) -> dict[str, Any]:
    refuse_unknown(request)
    if request.top_n is not None and request.top_n < 1:
        raise InvalidRequest(f"top_n must be at least 1, got {request.top_n}", param="top_n")
    texts = [d if isinstance(d, str) else d.text for d in request.documents]
    config = engine.model(request.model)
    async with engine.runner(config, "rerank") as runner:
        reply: pb.RerankReply = await runner.call("rerank", pb.RerankRequest(query=request.query, documents=texts))
    order = sorted(range(len(texts)), key=lambda i: -reply.scores[i])
    top = order[: min(request.top_n or len(texts), len(texts))]
    results = []
    for index in top:
        result: dict[str, Any] = {"index": index, "relevance_score": float(reply.scores[index])}
        if request.return_documents:
            result["document"] = {"text": texts[index]}
        results.append(result)
    return {"model": request.model, "results": results,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    content: str
    add_special: bool = False
    parse_special: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    tokens: list[int]


async def tokenize(request: TokenizeRequest, engine: Engine) -> dict[str, Any]:
    refuse_unknown(request)
    config = engine.model(request.model)
    async with engine.runner(config, "tokenize") as runner:
        tokens = await runner.call("tokenize", request.content, add_special=request.add_special,
                                   parse_special=request.parse_special)
    return {"tokens": tokens}


async def detokenize(request: DetokenizeRequest, engine: Engine) -> dict[str, Any]:
    refuse_unknown(request)
    if any(not 0 <= token <= INT32_MAX for token in request.tokens):
        raise InvalidRequest("token ids must be between 0 and 2147483647", param="tokens")
    config = engine.model(request.model)
    async with engine.runner(config, "tokenize") as runner:
        content = await runner.call("detokenize", request.tokens)
    return {"content": content}


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/embeddings")
@router.post("/embeddings", include_in_schema=False)
async def embeddings_route(body: EmbeddingRequest, request: Request) -> Any:
    return await until_disconnect(request, create_embeddings(body, request.app.state.engine))


@router.post("/v1/rerank")
@router.post("/rerank", include_in_schema=False)
async def rerank_route(body: RerankRequest, request: Request) -> Any:
    return await until_disconnect(request, rerank(body, request.app.state.engine))


@router.post("/v1/tokenize")
@router.post("/tokenize", include_in_schema=False)
async def tokenize_route(body: TokenizeRequest, request: Request) -> Any:
    return await tokenize(body, request.app.state.engine)


@router.post("/v1/detokenize")
@router.post("/detokenize", include_in_schema=False)
async def detokenize_route(body: DetokenizeRequest, request: Request) -> Any:
    return await detokenize(body, request.app.state.engine)
