"""Runner management: which models are loaded, and loading or unloading one by hand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from hearth.engine import Engine

router = APIRouter()


class ModelRef(BaseModel):
    model: str = Field(min_length=1)


@router.get("/runners")
async def runners(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    return {"runners": engine.runners.status(), "load_failures": engine.runners.failures}


@router.post("/runners/load")
async def load(body: ModelRef, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    runner = await engine.runners.ensure_loaded(engine.model(body.model))
    return runner.status()


@router.post("/runners/unload")
async def unload(body: ModelRef, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    config = engine.model(body.model)
    return {"model": body.model, "unloaded": await engine.runners.unload(config.name)}
