"""Unpacking a downloaded archive (LocalAI's piper voices come as `.tar.gz`) without trusting it.

Every member must be a plain file or folder whose name stays inside the archive's folder: an absolute name, a `..`,
a link, a device or a fifo is refused with a message naming the member. The whole archive may hold at most
`MAX_MEMBERS` members and `MAX_BYTES` bytes unpacked (checked against the headers before anything is written,
and again while copying), and no more than the free disk. Members are unpacked into a staging folder beside the
target and moved into place only when all of them are out, so a refused or broken archive leaves nothing behind.
tarfile's own `data` filter (PEP 706) runs as well, as a second line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

from hearth.gallery.download import DownloadError

MAX_BYTES = 8 * 2**30
MAX_MEMBERS = 10_000
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.xz", ".tar.bz2")


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _checked_members(archive: tarfile.TarFile, label: str, max_bytes: int) -> list[tarfile.TarInfo]:
    members, total = [], 0
    for member in archive:
        if len(members) >= MAX_MEMBERS:
            raise DownloadError(f"{label} holds more than {MAX_MEMBERS} members; refused")
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or PurePosixPath(name).is_absolute():
            raise DownloadError(f"{label}: member '{name}' has an absolute path; refused")
        if ".." in parts or "\\" in name or "\x00" in name:
            raise DownloadError(f"{label}: member '{name}' would leave its folder ('..'); refused")
        if member.issym() or member.islnk():
            raise DownloadError(f"{label}: member '{name}' is a link (to '{member.linkname}'); archives may hold "
                                f"only files and folders")
        if not (member.isfile() or member.isdir()):
            raise DownloadError(f"{label}: member '{name}' is a device, fifo or other special file; refused")
        total += member.size
        if total > max_bytes:
            raise DownloadError(f"{label} unpacks to more than {max_bytes} bytes; refused")
        members.append(member)
    return members


def unpack(archive_path: Path, into: Path, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Unpack `archive_path` into the folder `into`; returns the paths placed there (top-level first)."""
    label = archive_path.name
    staging = into / f".unpack-{uuid.uuid4().hex[:12]}.partial"
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            members = _checked_members(archive, label, max_bytes)
            needed = sum(m.size for m in members)
            free = shutil.disk_usage(into).free
            if needed > free:
                raise DownloadError(f"not enough disk space to unpack {label}: {needed / 2**20:.0f} MiB are needed "
                                    f"but only {free / 2**20:.0f} MiB are free")
            staging.mkdir(parents=True)
            written = 0
            for member in members:
                tarfile.data_filter(member, str(staging))  # PEP 706's checks too; raises FilterError
                target = staging / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                if source is None:
                    raise DownloadError(f"{label}: member '{member.name}' cannot be read")
                with source, target.open("wb") as out:
                    while block := source.read(2**20):
                        written += len(block)
                        if written > max_bytes:
                            raise DownloadError(f"{label} unpacks to more than {max_bytes} bytes; refused")
                        out.write(block)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, tarfile.FilterError):
            raise DownloadError(f"{label}: {exc}; refused") from None
        raise DownloadError(f"{label} is not a readable archive: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    placed: list[Path] = []
    try:
        for item in sorted(staging.iterdir()):
            target = into / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            placed.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [*placed, *(p for top in placed if top.is_dir() for p in sorted(top.rglob("*")))]


def remove_placed(paths: list[Path]) -> None:
    """Undo `unpack` (used when a later step of an install fails)."""
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
