"""Model management with LocalAI's shapes: /models/available, /models/apply, /models/jobs, /models/delete.

Installs run as background jobs in the API process; an installed model is usable at once (the models directory
is re-read on the next request). When `admin_api_key` is set, only that key may call these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.engine import Engine
from hearth.errors import HearthError, InvalidRequest, NotFound, Unauthorized
from hearth.gallery.download import DownloadError, Sources, Transfer
from hearth.gallery.index import (
    GalleryEntry,
    GalleryFile,
    delete_model,
    fetch_text,
    install_entry,
    is_installed,
    load_galleries,
    parse_index,
)

log = logging.getLogger("hearth.gallery")


@dataclass
class Job:
    id: str
    name: str
    state: str = "queued"  # queued, downloading, done, failed, cancelled
    error: str | None = None
    transfer: Transfer = field(default_factory=Transfer)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        processed = self.state in ("done", "failed", "cancelled")
        t = self.transfer
        return {"uuid": self.id, "name": self.name, "state": self.state, "processed": processed,
                "progress": 100.0 if self.state == "done" else t.percent, "error": self.error,
                "message": self.error or self.state, "downloaded_bytes": t.done, "total_bytes": t.total,
                "speed_bytes_per_second": round(t.speed), "file": t.stage}


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def start(self, engine: Engine, entry: GalleryEntry, name: str | None, overrides: dict[str, Any]) -> Job:
        job = Job(id=str(uuid.uuid4()), name=name or entry.name)
        self.jobs[job.id] = job

        async def run() -> None:
            job.state = "downloading"
            try:
                await install_entry(entry, engine.settings.models_dir, engine.settings.cache_dir, sources(engine),
                                    overrides, name, cancelled=job.cancel.is_set, transfer=job.transfer)
                job.state = "done"
                log.info("installed model %s", job.name)
            except (DownloadError, OSError) as exc:
                job.state = "cancelled" if job.cancel.is_set() else "failed"
                job.error = str(exc)
                log.warning("installing %s failed: %s", job.name, exc)

        job.task = asyncio.create_task(run())
        return job


def sources(engine: Engine) -> Sources:
    return Sources.from_settings(engine.settings)


async def entry_from_url(url: str, name: str | None, source: Sources) -> GalleryEntry:
    """A gallery entry published as YAML at `url` (LocalAI's `apply` with a config URL); a list takes `name`."""
    try:
        found = parse_index(await fetch_text(url, source), url)
    except DownloadError as exc:
        raise InvalidRequest(f"the entry at {url} cannot be used: {exc}", param="url") from None
    if len(found) == 1:
        return found[0]
    chosen = next((e for e in found if e.name == name), None)
    if chosen is None:
        raise InvalidRequest(f"{url} lists {len(found)} entries; send 'name' to pick one", param="name")
    return chosen


def require_admin(request: Request) -> None:
    key = request.app.state.engine.settings.admin_api_key
    if not key:
        return
    presented = request.headers.get("authorization", "")
    presented = presented[7:].strip() if presented[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(presented.encode(), key.encode()):
        raise Unauthorized("installing and deleting models needs the admin API key")


def jobs_of(request: Request) -> Jobs:
    state = request.app.state
    if not hasattr(state, "gallery_jobs"):
        state.gallery_jobs = Jobs()
    return state.gallery_jobs


async def entries(engine: Engine) -> dict[str, GalleryEntry]:
    try:
        return await load_galleries(list(engine.settings.galleries), sources(engine))
    except DownloadError as exc:
        raise HearthError(f"a gallery could not be read: {exc}") from None


class ApplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    url: str | None = None
    name: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")


router = APIRouter()


@router.get("/models/available")
async def available(request: Request) -> list[dict[str, Any]]:
    engine: Engine = request.app.state.engine
    models_dir = engine.settings.models_dir
    return [{"name": e.name, "id": f"{e.gallery}@{e.name}", "description": e.description, "license": e.license,
             "tags": e.tags, "urls": e.urls, "gallery": e.gallery, "installed": is_installed(e, models_dir)}
            for e in (await entries(engine)).values()]


@router.post("/models/apply")
async def apply(body: ApplyRequest, request: Request) -> dict[str, Any]:
    require_admin(request)
    engine: Engine = request.app.state.engine
    if body.id:
        name = body.id.split("@", 1)[1] if "@" in body.id else body.id
        found = (await entries(engine)).get(name)
        if found is None:
            raise NotFound(f"no gallery entry '{name}'; see GET /models/available")
        entry = found
    elif body.url and PurePosixPath(urlsplit(body.url).path).suffix in (".yaml", ".yml"):
        entry = await entry_from_url(body.url, body.name, sources(engine))
    elif body.url:
        filename = PurePosixPath(urlsplit(body.url).path).name
        if not filename:
            raise InvalidRequest("the url does not end in a file name", param="url")
        model_name = body.name or filename.rsplit(".", 1)[0]
        try:
            entry = GalleryEntry(name=model_name, files=[GalleryFile(filename=filename, uri=body.url,
                                                                      sha256=body.sha256)],
                                 config={"parameters": {"model": filename}})
        except ValueError as exc:
            raise InvalidRequest(f"cannot install from this url: {exc}", param="url") from None
    else:
        raise InvalidRequest("send 'id' (a gallery entry) or 'url' (a model file)", param="id")
    job = jobs_of(request).start(engine, entry, body.name, body.overrides)
    return {"uuid": job.id, "status": f"{request.base_url}models/jobs/{job.id}"}


@router.get("/models/jobs")
async def all_jobs(request: Request) -> list[dict[str, Any]]:
    return [job.view() for job in jobs_of(request).jobs.values()]


@router.get("/models/jobs/{job_id}")
async def one_job(job_id: str, request: Request) -> dict[str, Any]:
    job = jobs_of(request).jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job.view()


@router.delete("/models/jobs/{job_id}")
@router.post("/models/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    require_admin(request)
    job = jobs_of(request).jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    job.cancel.set()
    if job.task is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(job.task), timeout=10)
    return job.view()


@router.post("/models/delete/{name}")
async def delete(name: str, request: Request) -> dict[str, Any]:
    require_admin(request)
    engine: Engine = request.app.state.engine
    config = engine.model(name)
    with contextlib.suppress(Exception):
        await engine.runners.unload(config.name)
    try:
        removed = await asyncio.to_thread(delete_model, config.name, engine.settings.models_dir,
                                          engine.registry.models())
    except DownloadError as exc:
        raise InvalidRequest(str(exc), param="name") from None
    return {"deleted": config.name, "removed": removed}
