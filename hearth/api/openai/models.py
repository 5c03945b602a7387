"""GET /v1/models and /v1/models/{id}: every name a client can send, aliases included."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from hearth.api.routing import HearthRoute
from hearth.config.schema import ModelConfig
from hearth.engine import Engine
from hearth.errors import ModelNotFound

router = APIRouter(route_class=HearthRoute)


def _created(config: ModelConfig) -> int:
    try:
        return int(os.stat(config.source_file or "").st_mtime)
    except OSError:
        return 0


def model_object(name: str, config: ModelConfig) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": name, "object": "model", "created": _created(config), "owned_by": "hearth"}
    if name != config.name:
        entry["alias_of"] = config.name
    return entry


def list_models(engine: Engine) -> dict[str, Any]:
    data = []
    for config in engine.registry.models():
        if config.disabled:
            continue
        data.extend(model_object(name, config) for name in config.names)
    return {"object": "list", "data": data}


def get_model(engine: Engine, model_id: str) -> dict[str, Any]:
    config = engine.registry.lookup(model_id)
    if config is None or config.disabled:
        engine.registry.get(model_id)  # raises the descriptive not-found error
        raise ModelNotFound(f"model '{model_id}' not found", param="model")
    return model_object(model_id, config)


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def models(request: Request) -> dict[str, Any]:
    return list_models(request.app.state.engine)


@router.get("/v1/models/{model_id:path}")
@router.get("/models/{model_id:path}", include_in_schema=False)
async def model(model_id: str, request: Request) -> dict[str, Any]:
    return get_model(request.app.state.engine, model_id)
