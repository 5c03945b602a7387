"""Liveness, readiness, version and Prometheus metrics; /healthz and /readyz stay open even when API keys are set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hearth import __version__
from hearth.api.routing import HearthRoute
from hearth.engine import Engine

router = APIRouter(route_class=HearthRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    body: dict[str, Any] = {"status": "ready" if engine.ready else "starting"}
    if engine.preload_errors:
        body["preload_errors"] = engine.preload_errors
    return JSONResponse(body, status_code=200 if engine.ready else 503)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"name": "hearth", "version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format 0.0.4); API keys, when set, guard this route like any other."""
    engine: Engine = request.app.state.engine
    runners = engine.runners
    gauges = [
        ("hearth_info", "Always 1; the server's version is its label.", [({"version": __version__}, 1)]),
        ("hearth_models_loaded", "Models whose runner is ready now.",
         [({}, sum(1 for r in runners.runners.values() if r.state == "ready"))]),
        ("hearth_model_requests_in_flight", "Requests a loaded model is serving now, by model.",
         [({"model": r.name}, r.active) for r in runners.runners.values()]),
    ]
    return Response(runners.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")
