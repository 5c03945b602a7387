"""Model management with LocalAI's shapes: /models/available, /models/apply, /models/jobs, /models/delete.

Installs run as background jobs in the API process; an installed model is usable at once (the models directory
is re-read on the next request). When `admin_api_key` is set, only that key may call these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.routing import HearthRoute
from hearth.engine import Engine
from hearth.errors import InvalidRequest, NotFound, Unauthorized
from hearth.gallery.catalog import Catalog, Listing, fetch_text, parse_entry, read_index, remote_url
from hearth.gallery.download import DownloadError
from hearth.gallery.entry import GalleryEntry, GalleryFile
from hearth.gallery.install import delete_model, is_installed
from hearth.gallery.jobs import Jobs

log = logging.getLogger("hearth.gallery")


def catalog_of(request: Request) -> Catalog:
    """The server's galleries, read once and kept (see hearth/gallery/catalog.py)."""
    state = request.app.state
    if not hasattr(state, "gallery_catalog"):
        state.gallery_catalog = Catalog(state.engine.settings)
    return state.gallery_catalog


async def entry_from_url(url: str, name: str | None, catalog: Catalog) -> GalleryEntry:
    """What LocalAI's `apply` with a `url` means: the YAML there is a whole index (`name` picks the entry), one entry
    published on its own, or a base config (which reads as an entry too)."""
    try:
        location = remote_url(url, catalog.settings.github_raw_url)
        items = await asyncio.to_thread(read_index, await fetch_text(location, catalog.sources), url)
    except DownloadError as exc:
        raise InvalidRequest(f"the gallery at {url} cannot be used: {exc}", param="url") from None
    if len(items) != 1:
        if not name:
            raise InvalidRequest(f"{url} lists {len(items)} entries; send 'name' to pick one", param="name")
        items = [item for item in items if isinstance(item, dict) and str(item.get("name", "")).strip() == name]
        if not items:
            raise NotFound(f"{url} has no entry '{name}'")
    elif isinstance(items[0], dict) and not items[0].get("name"):  # a base config names no model: the request does
        items = [{**items[0], "name": name or PurePosixPath(urlsplit(location).path).stem}]
    try:
        return parse_entry(items[-1], url)
    except ValueError as exc:
        raise InvalidRequest(f"the entry at {url} cannot be used: {exc}", param="url") from None


def require_admin(request: Request) -> None:
    key = request.app.state.engine.settings.admin_api_key
    if not key:
        return
    presented = request.headers.get("authorization", "")
    presented = presented[7:].strip() if presented[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(presented.encode(), key.encode()):
        raise Unauthorized("installing and deleting models needs the admin API key")


def jobs_of(request: Request) -> Jobs:
    return request.app.state.engine.jobs


async def find_entry(request: Request, wanted: str) -> GalleryEntry:
    """A gallery entry that can be installed, by name or `gallery@name`; 404 or 400 saying why not."""
    listing = await catalog_of(request).listing()
    found = listing.find(wanted)
    if found is None:
        errors = listing.errors()
        raise NotFound(f"no gallery entry '{wanted}'; see GET /models/available"
                       + (f" (galleries that could not be read: {'; '.join(errors)})" if errors else ""),
                       param="id")
    if found.entry is None or not found.available:
        raise InvalidRequest(f"'{wanted}' cannot be installed here: {found.assessment.reason}", param="id")
    return found.entry


class ApplyRequest(BaseModel):
    """LocalAI's body: a gallery `id`, or a `url` (an index, an entry or a base config; or a model file), with the
    name, overrides and extra files to install it with. LocalAI's descriptive fields are accepted and unused."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    url: str | None = None
    name: str | None = Field(None, min_length=1, max_length=256)
    overrides: dict[str, Any] = Field(default_factory=dict)
    files: list[GalleryFile] = Field(default_factory=list)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    variant: str | None = None
    description: str | None = None
    license: str | None = None
    urls: list[str] | None = None
    icon: str | None = None
    tags: list[str] | None = None


router = APIRouter(route_class=HearthRoute)


@router.get("/models/available")
async def available(request: Request) -> list[dict[str, Any]]:
    """Every gallery entry, each with `available` and, when it cannot be installed here, the `reason`."""
    engine: Engine = request.app.state.engine
    listing: Listing = await catalog_of(request).listing()
    models_dir = engine.settings.models_dir
    # One look at the models directory per entry (LocalAI's gallery has 1,700): off the event loop.
    return await asyncio.to_thread(lambda: [item.view(item.entry is not None and is_installed(item.entry, models_dir))
                                            for item in listing.items])


@router.get("/models/galleries")
async def galleries(request: Request) -> list[dict[str, Any]]:
    """The galleries (LocalAI's route): each with its entry counts, or the error that keeps it out."""
    listing: Listing = await catalog_of(request).listing()
    return [state.view() for state in listing.galleries]


@router.post("/models/apply")
async def apply(body: ApplyRequest, request: Request) -> dict[str, Any]:
    require_admin(request)
    engine: Engine = request.app.state.engine
    catalog = catalog_of(request)
    if body.id:
        entry = await find_entry(request, body.id)
    elif body.url and (body.url.startswith("github:")
                       or PurePosixPath(urlsplit(body.url).path).suffix in (".yaml", ".yml")):
        entry = await entry_from_url(body.url, body.name, catalog)
    elif body.url:
        try:
            entry = GalleryEntry.for_file(body.url, body.name, body.sha256)
        except ValueError as exc:
            raise InvalidRequest(f"cannot install from this url: {exc}", param="url") from None
    else:
        raise InvalidRequest("send 'id' (a gallery entry) or 'url' (a gallery, an entry or a model file)", param="id")
    if body.files:
        entry = entry.model_copy(update={"files": [*entry.files, *body.files]})
    job = jobs_of(request).start(engine.settings, catalog, entry, body.name, body.overrides)
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
