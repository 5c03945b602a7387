"""Liveness, readiness and version; /healthz and /readyz stay open even when API keys are set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hearth import __version__
from hearth.engine import Engine

router = APIRouter()


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
