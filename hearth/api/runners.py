"""Runner management: which models are loaded, and loading or unloading one by hand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from hearth.api.routing import HearthRoute
from hearth.engine import Engine
from hearth.errors import HearthError

router = APIRouter(route_class=HearthRoute)


class ModelRef(BaseModel):
    model: str = Field(min_length=1)


@router.get("/runners")
async def runners(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    return {"runners": engine.runners.status(), "load_failures": engine.runners.failures}


@router.get("/runners/models")
async def model_states(request: Request) -> dict[str, Any]:
    """Every installed model with what it is for and the state of its runner (for the web page's Models tab):
    idle or busy (loaded), loading, stopping, failed (with the reason), or not loaded."""
    engine: Engine = request.app.state.engine
    live = {r.name: r for r in sorted(engine.runners.runners.values(), key=lambda r: -r.replica)}  # replica 0's
    models = []
    for config in engine.registry.models():
        if config.disabled:
            continue
        entry: dict[str, Any] = {"name": config.name, "aliases": list(config.alias), "backend": config.canonical_backend,
                                 "usecases": config.usecases, "description": config.description, "reason": None,
                                 "capabilities": [], "active_requests": 0,
                                 "context_size": config.context_size}  # the YAML's, until the runner says
        runner = live.get(config.name)
        if config.pipeline is not None:  # no runner of its own: loaded when its parts are
            parts = config.pipeline.parts()
            ready = [part for part in parts if (r := live.get(_canonical(engine, part))) and r.state == "ready"]
            entry.update(backend="pipeline", state="idle" if len(ready) == len(parts) else "not loaded")
        elif runner is not None and runner.state != "dead":
            status = runner.status()
            state = {"ready": "busy" if runner.active else "idle"}.get(runner.state, runner.state)
            entry.update(state=state, capabilities=status["capabilities"], active_requests=status["active_requests"],
                         context_size=status["context_size"], idle_seconds=status["idle_seconds"],
                         load_seconds=status["load_seconds"],
                         voices=list(runner.info.voices) if runner.info else [],
                         image_sizes=list(runner.info.image_sizes) if runner.info else [])
            replicas = engine.runners.replicas(config.name)
            if len(replicas) > 1 or status["node"]:  # on a Ray cluster: each copy, where it runs and what it does
                entry["replicas"] = [{"replica": r.replica, "node": s["node"], "active_requests": r.active,
                                      "state": {"ready": "busy" if r.active else "idle"}.get(r.state, r.state)}
                                     for r in sorted(replicas, key=lambda r: r.replica) if (s := r.status())]
        elif config.name in engine.runners.failures:
            entry.update(state="failed", reason=engine.runners.failures[config.name])
        else:
            entry["state"] = "not loaded"
        models.append(entry)
    return {"models": models}


def _canonical(engine: Engine, name: str) -> str:
    """The model's own name for a name a client may use (an alias), or the name itself when none claims it."""
    try:
        return engine.model(name).name
    except HearthError:
        return name


@router.post("/runners/load")
async def load(body: ModelRef, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    config = engine.model(body.model)
    runners = await engine.load(config)
    return runners[0].status() if config.pipeline is None else \
        {"name": config.name, "parts": [runner.status() for runner in runners]}


@router.post("/runners/unload")
async def unload(body: ModelRef, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    config = engine.model(body.model)
    return {"model": body.model, "unloaded": await engine.runners.unload(config.name)}
