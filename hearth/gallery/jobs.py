"""Installs as jobs: each has an id, a state and its download's progress, for /models/jobs (and Ollama's pull).

The server's installs run here in the background; a runner on a Ray cluster that installs its model on its node adds a
job of its own and reports the node's progress into it (hearth/runtime/cluster.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hearth.gallery.download import DownloadError, Transfer
from hearth.gallery.install import install_entry

if TYPE_CHECKING:
    from hearth.gallery.catalog import Catalog
    from hearth.gallery.entry import GalleryEntry
    from hearth.settings import Settings

log = logging.getLogger("hearth.gallery")


@dataclass
class Job:
    id: str
    name: str
    state: str = "queued"  # queued, downloading, done, failed, cancelled
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    transfer: Transfer = field(default_factory=Transfer)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        processed = self.state in ("done", "failed", "cancelled")
        t = self.transfer
        return {"uuid": self.id, "name": self.name, "state": self.state, "processed": processed,
                "progress": 100.0 if self.state == "done" else t.percent, "error": self.error,
                "message": self.error or "; ".join([self.state, *self.notes]), "notes": self.notes,
                "downloaded_bytes": t.done, "total_bytes": t.total, "speed_bytes_per_second": round(t.speed),
                "file": t.stage}


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def add(self, name: str) -> Job:
        """A job for the API to show, which its maker runs and updates."""
        job = Job(id=str(uuid.uuid4()), name=name)
        self.jobs[job.id] = job
        return job

    def start(self, settings: Settings, catalog: Catalog, entry: GalleryEntry, name: str | None,
              overrides: dict[str, Any]) -> Job:
        """Install `entry` in the background."""
        job = self.add(name or entry.name)

        async def run() -> None:
            job.state = "downloading"
            try:
                await install_entry(entry, settings.models_dir, settings.cache_dir, catalog.sources,
                                    overrides, name, cancelled=job.cancel.is_set, transfer=job.transfer,
                                    catalog=catalog, notes=job.notes)
                job.state = "done"
                log.info("installed model %s", job.name)
            except (DownloadError, OSError) as exc:
                job.state = "cancelled" if job.cancel.is_set() else "failed"
                job.error = str(exc)
                log.warning("installing %s failed: %s", job.name, exc)
            except Exception as exc:  # a fault of Hearth's own: the job still ends, saying so
                job.state = "failed"
                job.error = f"the install failed unexpectedly: {type(exc).__name__}: {exc}"
                log.exception("installing %s failed unexpectedly", job.name)

        job.task = asyncio.create_task(run())
        return job
