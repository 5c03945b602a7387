"""The galleries' entries, read entry by entry: which can be installed, and why the others cannot.

A gallery is a YAML index at a file path, an http(s) URL or `github:owner/repo/path@ref` (read from
raw.githubusercontent.com, or the `github_raw_url` mirror). Indexes and the base configs their entries name (`url:`)
are fetched once and kept, on disk in the cache folder and parsed in memory, for `gallery_cache_minutes`; a fetch
that failed is tried again after a minute. One entry that cannot be used never takes the others with it: it is
listed with the reason. An index that cannot be read (unreachable, not YAML, over the size or entry limits) is
reported by its gallery's state, naming the URL, and the other galleries stay available.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from hearth.config.yamlread import YamlTooLarge, load_untrusted
from hearth.gallery.assess import Assessment, assess, portable
from hearth.gallery.download import DownloadError, Sources, fetch_small
from hearth.gallery.entry import GalleryEntry, GalleryFile
from hearth.settings import GallerySource, Settings

log = logging.getLogger("hearth.gallery")

MAX_INDEX_BYTES = 16 * 2**20  # LocalAI's own index is 2.4 MB
MAX_BASE_BYTES = 2**20
MAX_ENTRIES = 20_000  # LocalAI's has 1,709
MAX_NODES = 4_000_000  # YAML nodes once aliases are expanded (LocalAI's index: about 150,000)
MAX_BASES = 500  # distinct base configs one gallery may name (LocalAI's names about 70)
RETRY_FAILED = 60.0  # seconds before a fetch that failed is tried again
FETCHES_AT_ONCE = 8


def github_url(location: str, raw_root: str) -> str:
    """The URL of `github:owner/repo/path@ref` (ref `main` when not given)."""
    where, _, ref = location[len("github:"):].partition("@")
    parts = where.strip("/").split("/", 2)
    if len(parts) < 3 or not all(parts) or ".." in where.split("/") or not all(p.strip() for p in parts):
        raise DownloadError(f"'{location}' is not github:OWNER/REPO/PATH[@REF]")
    owner, repo, path = parts
    return f"{raw_root.rstrip('/')}/{owner}/{repo}/{ref or 'main'}/{path}"


def remote_url(location: str, raw_root: str = "https://raw.githubusercontent.com") -> str:
    """The URL a `github:` or http(s) location is fetched from; anything else is refused."""
    if location.startswith("github:"):
        return github_url(location, raw_root)
    if location.startswith(("https://", "http://")):
        return location
    raise DownloadError(f"'{location}' must be a github:OWNER/REPO/PATH[@REF] or http(s) URL")


async def fetch_text(url: str, sources: Sources, max_bytes: int = MAX_INDEX_BYTES) -> str:
    """The body of `url` as text, fetched under the download address rules; DownloadError names the URL."""
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=30) as client:
        body, _ = await fetch_small(client, url, sources, max_bytes)
    return body.decode("utf-8", errors="replace")


def read_index(text: str, origin: str) -> list[Any]:
    """An index's items, not yet checked one by one: a YAML list of entries, or one entry on its own."""
    try:
        data = load_untrusted(text, MAX_NODES)
    except YamlTooLarge as exc:
        raise DownloadError(f"gallery {origin} is refused: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, and a scanner's odd failures on hostile text
        raise DownloadError(f"gallery {origin} is not valid YAML: {exc}") from None
    if data is None:
        return []
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DownloadError(f"gallery {origin} must be a YAML list of entries, or one entry")
    if len(data) > MAX_ENTRIES:
        raise DownloadError(f"gallery {origin} has {len(data)} entries; at most {MAX_ENTRIES} are read")
    return data


def parse_entry(item: Any, gallery: str) -> GalleryEntry:
    """One entry, or ValueError saying what is wrong with it."""
    try:
        return GalleryEntry.from_raw(item, gallery)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None


def parse_index(text: str, origin: str) -> list[GalleryEntry]:
    """Every entry of an index, or DownloadError at the first that cannot be read (for one entry published alone)."""
    entries = []
    for index, item in enumerate(read_index(text, origin)):
        try:
            entries.append(parse_entry(item, origin))
        except ValueError as exc:
            raise DownloadError(f"gallery {origin}, entry {index}: {exc}") from None
    return entries


@dataclass
class BaseConfig:
    """A base config (LocalAI's `url:`): its config and files."""

    config: dict[str, Any]
    files: list[GalleryFile]


def read_base(text: str, url: str) -> BaseConfig:
    """A base config as LocalAI publishes them: a mapping with `config_file` (a YAML string or mapping) and
    `files`."""
    try:
        data = load_untrusted(text, MAX_NODES // 16)
    except Exception as exc:  # yaml.YAMLError, YamlTooLarge
        raise DownloadError(f"the base config at {url} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DownloadError(f"the base config at {url} must be a mapping with a 'config_file'")
    try:
        shaped = GalleryEntry.from_raw({**data, "name": data.get("name") or "base"}, url)
    except (ValidationError, ValueError) as exc:
        raise DownloadError(f"the base config at {url} cannot be used: {exc}") from None
    return BaseConfig(config=shaped.config, files=shaped.files)


@dataclass
class Listed:
    """One entry of a gallery as Hearth sees it: usable, or not and why."""

    gallery: str
    index: int
    name: str
    entry: GalleryEntry | None  # None: the entry itself could not be read
    assessment: Assessment

    @property
    def available(self) -> bool:
        return self.entry is not None and self.assessment.usable

    def view(self, installed: bool) -> dict[str, Any]:
        entry = self.entry
        return {"name": self.name, "id": f"{self.gallery}@{self.name}", "gallery": self.gallery,
                "description": entry.description if entry else "", "license": entry.license if entry else "",
                "tags": entry.tags if entry else [], "urls": entry.urls if entry else [],
                "icon": entry.icon if entry else "", "backend": self.assessment.backend,
                "available": self.available, "reason": self.assessment.reason, "installed": installed}


@dataclass
class GalleryState:
    name: str
    url: str
    entries: int = 0
    unavailable: int = 0
    error: str | None = None
    read_at: float = 0.0

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "entries": self.entries, "unavailable": self.unavailable,
                "error": self.error, "read_at": self.read_at}


@dataclass
class Listing:
    items: list[Listed] = field(default_factory=list)
    galleries: list[GalleryState] = field(default_factory=list)

    def find(self, wanted: str) -> Listed | None:
        """An entry by name, or `gallery@name`; a later gallery's usable entry wins over an earlier one's."""
        gallery, at, bare = wanted.partition("@")
        if at and gallery in {g.name for g in self.galleries}:
            return self.find_name(bare, gallery)
        return self.find_name(wanted) or (self.find_name(bare) if at else None)

    def find_name(self, name: str, gallery: str | None = None) -> Listed | None:
        found = [item for item in self.items if item.name == name and (gallery is None or item.gallery == gallery)]
        usable = [item for item in found if item.available]
        return (usable or found or [None])[-1]

    def errors(self) -> list[str]:
        return [f"gallery {g.name} ({g.url}): {g.error}" for g in self.galleries if g.error]


class TextCache:
    """Fetched gallery files, kept on disk (so the CLI and a restarted server reuse them) and in memory."""

    def __init__(self, folder: Path, ttl: float) -> None:
        self.folder = folder
        self.ttl = ttl
        self.memory: dict[str, tuple[float, str | None, str | None]] = {}  # url -> (time, text, error)

    def _paths(self, url: str) -> tuple[Path, Path]:
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        return self.folder / f"{key}.yaml", self.folder / f"{key}.json"

    def _fresh(self, stamp: float, failed: bool) -> bool:
        return time.time() - stamp < (min(RETRY_FAILED, self.ttl) if failed else self.ttl)

    async def get(self, url: str, sources: Sources, max_bytes: int) -> str:
        remembered = self.memory.get(url)
        if remembered is None:
            remembered = await asyncio.to_thread(self._read_disk, url)
        if remembered is not None and self._fresh(remembered[0], remembered[2] is not None):
            _, text, error = remembered
            if error is not None:
                raise DownloadError(error)
            assert text is not None
            return text
        try:
            text = await fetch_text(url, sources, max_bytes)
        except DownloadError as exc:
            self.memory[url] = (time.time(), None, str(exc))
            raise
        self.memory[url] = (time.time(), text, None)
        await asyncio.to_thread(self._write_disk, url, text)
        return text

    def _read_disk(self, url: str) -> tuple[float, str | None, str | None] | None:
        body, meta = self._paths(url)
        try:
            stamp = json.loads(meta.read_text(encoding="utf-8"))["fetched"]
            return float(stamp), body.read_text(encoding="utf-8"), None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_disk(self, url: str, text: str) -> None:
        body, meta = self._paths(url)
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            for path, content in ((body, text), (meta, json.dumps({"url": url, "fetched": time.time()}))):
                partial = path.with_name(f".{path.name}.partial")
                partial.write_text(content, encoding="utf-8")
                os.replace(partial, path)


class Catalog:
    """Every configured gallery's entries (the built-in one first), assessed and cached."""

    def __init__(self, settings: Settings, sources: Sources | None = None) -> None:
        self.settings = settings
        self.sources = sources or Sources.from_settings(settings)
        ttl = settings.gallery_cache_minutes * 60
        self.texts = TextCache(settings.cache_dir / "galleries", ttl)
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._parsed: dict[str, tuple[str, list[Any]]] = {}  # url -> (digest of the text, items)
        self._bases: dict[str, tuple[str, BaseConfig]] = {}  # location -> (digest of the text, parsed)
        self._listing: tuple[float, tuple[Any, ...], Listing] | None = None

    # -- fetching ------------------------------------------------------------------------------------------

    async def _index_items(self, source: GallerySource) -> list[Any]:
        location = source.url
        if location.startswith(("github:", "https://", "http://")):
            url = remote_url(location, self.settings.github_raw_url)
            text = await self.texts.get(url, self.sources, MAX_INDEX_BYTES)
        else:
            path = Path(location[len("file://"):] if location.startswith("file://") else location).expanduser()
            try:
                size = path.stat().st_size
                if size > MAX_INDEX_BYTES:
                    raise DownloadError(f"gallery {location} is {size} bytes, more than the {MAX_INDEX_BYTES} a "
                                        f"gallery index may be")
                text = await asyncio.to_thread(path.read_text, encoding="utf-8", errors="replace")
            except OSError as exc:
                raise DownloadError(f"gallery {location} cannot be read: {exc.strerror or exc}") from None
        digest = hashlib.sha256(text.encode()).hexdigest()
        cached = self._parsed.get(location)
        if cached is not None and cached[0] == digest:
            return cached[1]
        items = await asyncio.to_thread(read_index, text, location)
        self._parsed[location] = (digest, items)
        return items

    async def base(self, location: str) -> BaseConfig:
        """A base config (its text cached with the index); DownloadError names its URL."""
        url = remote_url(location, self.settings.github_raw_url)
        text = await self.texts.get(url, self.sources, MAX_BASE_BYTES)
        digest = hashlib.sha256(text.encode()).hexdigest()
        remembered = self._bases.get(location)
        if remembered is not None and remembered[0] == digest:
            return remembered[1]
        parsed = await asyncio.to_thread(read_base, text, url)
        self._bases[location] = (digest, parsed)
        return parsed

    async def _bases_of(self, entries: list[GalleryEntry]) -> dict[str, BaseConfig | DownloadError]:
        wanted = list(dict.fromkeys(e.url for e in entries if e.url))
        found: dict[str, BaseConfig | DownloadError] = {}
        for location in wanted[MAX_BASES:]:
            found[location] = DownloadError(f"the gallery names more than {MAX_BASES} base configs; {location} is "
                                            f"not read")
        gate = asyncio.Semaphore(FETCHES_AT_ONCE)

        async def one(location: str) -> None:
            async with gate:
                try:
                    found[location] = await self.base(location)
                except DownloadError as exc:
                    found[location] = exc

        await asyncio.gather(*(one(location) for location in wanted[:MAX_BASES]))
        return found

    # -- listing -------------------------------------------------------------------------------------------

    def _stamp(self) -> tuple[Any, ...]:
        """What a cached listing depends on besides time: the gallery files' sizes and times."""
        stamp = []
        for source in self.settings.galleries:
            if not source.url.startswith(("github:", "https://", "http://")):
                with contextlib.suppress(OSError):
                    st = Path(source.url.removeprefix("file://")).expanduser().stat()
                    stamp.append((source.url, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    async def listing(self) -> Listing:
        """Every entry of every gallery, assessed; cached until a gallery file changes or the cache time passes."""
        async with self._lock:
            stamp = self._stamp()
            if self._listing is not None:
                made, old_stamp, listing = self._listing
                fresh = time.monotonic() - made < min(self.ttl, RETRY_FAILED if listing.errors() else self.ttl)
                if fresh and old_stamp == stamp:
                    return listing
            listing = await self._build()
            self._listing = (time.monotonic(), stamp, listing)
            return listing

    async def _build(self) -> Listing:
        """Every gallery's entries, assessed. The CPU work (reading thousands of entries, judging each) runs in a
        thread, off the event loop that serves the streams; only the fetches are the loop's."""
        from hearth.gallery.builtin import builtin_entries

        def judge_builtin() -> list[Listed]:
            return [Listed("builtin", n, e.name, e, assess(e.config, e.files)) for n, e in enumerate(builtin_entries())]

        listing = Listing()
        listing.items += await asyncio.to_thread(judge_builtin)
        listing.galleries.append(GalleryState(name="builtin", url="built in", entries=len(listing.items),
                                              read_at=time.time()))
        for source in self.settings.galleries:
            state = GalleryState(name=source.name, url=source.url, read_at=time.time())
            listing.galleries.append(state)
            try:
                items = await self._index_items(source)
            except DownloadError as exc:
                state.error = str(exc)
                log.warning("gallery %s (%s) cannot be used: %s", source.name, source.url, exc)
                continue
            parsed = await asyncio.to_thread(_parse_all, items, source.name)
            bases = await self._bases_of([p for _, _, p in parsed if isinstance(p, GalleryEntry)])
            listed = await asyncio.to_thread(
                lambda name=source.name, parsed=parsed, bases=bases:
                [self._listed(name, index, item, entry, bases) for index, item, entry in parsed])
            listing.items += listed
            state.entries = len(listed)
            state.unavailable = sum(1 for item in listed if not item.available)
        return listing

    @staticmethod
    def _listed(gallery: str, index: int, item: Any, entry: GalleryEntry | str,
                bases: dict[str, BaseConfig | DownloadError]) -> Listed:
        if isinstance(entry, str):
            raw_name = item.get("name") if isinstance(item, dict) else None
            name = str(raw_name).strip() if isinstance(raw_name, str | int | float) and str(raw_name).strip() \
                else f"entry {index}"
            return Listed(gallery, index, name[:256], None,
                          Assessment(backend="", usable=False, reason=f"the entry cannot be read: {entry}"))
        base = bases.get(entry.url) if entry.url else None
        if isinstance(base, DownloadError):
            return Listed(gallery, index, entry.name, entry,
                          Assessment(backend=str(entry.overrides.get("backend") or ""), usable=False,
                                     reason=f"its base config {entry.url} cannot be read: {base}"))
        config, files = combine(entry, base)
        return Listed(gallery, index, entry.name, entry, assess(config, files))

    async def resolve(self, entry: GalleryEntry) -> tuple[dict[str, Any], list[GalleryFile]]:
        """The entry's whole config and files, its base config first (fetched now if it is not cached)."""
        base = await self.base(entry.url) if entry.url else None
        return combine(entry, base)


def _parse_all(items: list[Any], gallery: str) -> list[tuple[int, Any, GalleryEntry | str]]:
    """Each item as an entry, or the reason it is not one."""
    parsed: list[tuple[int, Any, GalleryEntry | str]] = []
    for index, item in enumerate(items):
        try:
            parsed.append((index, item, parse_entry(item, gallery)))
        except ValueError as exc:
            parsed.append((index, item, str(exc)))
    return parsed


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, mappings merged key by key (as LocalAI's mergo.WithOverride)."""
    result = dict(base)
    for key, value in extra.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def combine(entry: GalleryEntry, base: BaseConfig | None) -> tuple[dict[str, Any], list[GalleryFile]]:
    """LocalAI's order: the base config, the entry's own config, its overrides; the base's files, then the entry's
    (a file the entry lists again replaces the base's)."""
    config = merged(merged(base.config if base else {}, entry.config), entry.overrides)
    own = {f.filename for f in entry.files}
    files = [*(f for f in (base.files if base else []) if f.filename not in own), *entry.files]
    return portable(config), files
