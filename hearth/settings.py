"""Server settings: command-line flags beat environment variables (HEARTH_*), which beat defaults."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_models_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "hearth" / "models"


def default_cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "hearth"


def _split_list(value: Any) -> Any:
    """Accept "a,b" (environment) as well as a list (flags, code)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class GallerySource(BaseModel):
    """A gallery index: a file, an http(s) URL or `github:owner/repo/path@ref`, with the name entries' ids use."""

    name: str
    url: str


def _gallery_name(location: str) -> str:
    """A short name for a gallery given without one: the repository of a github: location, else the file's stem."""
    if location.startswith("github:"):
        parts = location[len("github:"):].split("/")
        if len(parts) > 1 and parts[1]:
            return parts[1].lower()
    stem = Path(location.split("?", 1)[0].rstrip("/")).stem
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "gallery"


def gallery_sources(value: Any) -> list[GallerySource]:
    """Galleries as users give them: locations (comma-separated in the environment), or LocalAI's GALLERIES JSON
    (`[{"name": "localai", "url": "github:mudler/LocalAI/gallery/index.yaml@master"}]`)."""
    if value is None:
        return []
    items: list[Any] = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and item.strip().startswith(("[", "{")):
            try:
                parsed = json.loads(item)
            except ValueError as exc:
                raise ValueError(f"galleries: not valid JSON ({exc})") from None
            items += parsed if isinstance(parsed, list) else [parsed]
        elif isinstance(item, str):
            items += [part.strip() for part in item.split(",") if part.strip()]
        else:
            items.append(item)
    sources: list[GallerySource] = []
    for item in items:
        if isinstance(item, GallerySource):
            source = item
        elif isinstance(item, str):
            source = GallerySource(name=_gallery_name(item), url=item)
        elif isinstance(item, dict) and isinstance(item.get("url"), str) and item["url"].strip():
            source = GallerySource(name=str(item.get("name") or _gallery_name(item["url"])), url=item["url"].strip())
        else:
            raise ValueError(f"galleries: {item!r} is neither a location nor {{\"name\": ..., \"url\": ...}}")
        taken = {s.name for s in sources}
        if source.name in taken:
            source = source.model_copy(update={"name": next(f"{source.name}-{n}" for n in range(2, 1000)
                                                            if f"{source.name}-{n}" not in taken)})
        sources.append(source)
    return sources


class Settings(BaseSettings):
    """Every server setting in one place."""

    model_config = SettingsConfigDict(env_prefix="HEARTH_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    models_dir: Path = Field(default_factory=default_models_dir)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The secret runners on network addresses (`runner: HOST:PORT`) require of every call.
    runner_secret: str = Field("", repr=False)
    # A Ray cluster to run the runners on (`auto`: the one this machine belongs to); empty: local processes.
    ray_address: str = ""
    ray_lease_seconds: float = Field(30.0, ge=1, description="a cluster runner no API process renews this long stops")
    ray_scale_down_seconds: float = Field(60.0, ge=0, description="a replica above min_replicas idle this long stops")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # Runners give up a thread while other processes keep theirs waiting for a core (hearth/cores.py); a model's
    # `adapt_threads` overrides this.
    adapt_threads: bool = True
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_loaded_models: int = Field(4, ge=1, description="least recently used runners are unloaded beyond this")
    idle_unload_minutes: float = Field(0, ge=0, description="unload a model unused this long; 0 keeps it")
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    runner_start_timeout: float = Field(60.0, gt=0)
    load_timeout: float = Field(600.0, gt=0)
    runner_watchdog_seconds: float = Field(60.0, ge=0, description="a runner with requests in flight that does not "
                                           "answer a health check this long is killed (0: no watchdog)")
    header_timeout_seconds: float = Field(10.0, ge=0, description="a request's headers must arrive within this")
    body_timeout_seconds: float = Field(30.0, ge=0, description="a request's body may pause no longer than this")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="on SIGTERM, how long running requests may finish")
    # The Realtime API (/v1/realtime): sessions at once, how long one may last, and how long it may stay silent.
    realtime_max_sessions: int = Field(8, ge=0, description="realtime WebSocket sessions at once; more are refused")
    realtime_session_minutes: float = Field(30.0, gt=0, description="a realtime session is closed after this")
    realtime_idle_seconds: float = Field(300.0, gt=0, description="a realtime session with no event this long is closed")
    log_level: str = "info"
    # Images in chat requests: http(s) URLs are fetched by the server, with these limits.
    image_fetch: bool = True  # false: only data: URLs
    web: bool = True  # serve the web page at / (static files, no data of their own)
    aio: bool = False  # `hearth run` installs LocalAI's whole all-in-one set, not only the default four
    image_fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts, IPs or CIDR ranges that may be fetched although private/loopback")
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Images are judged by their pixels before they are decoded (a small PNG can hold a huge picture), and decoding
    # them in the API process draws on one memory budget: requests beyond it wait their turn.
    image_max_megapixels: float = Field(50.0, gt=0, description="larger images are refused (400) before decoding")
    image_decode_memory_mb: int = Field(1024, ge=16, description="memory decoding images may hold at once")
    image_fetch_timeout: float = Field(10.0, gt=0)
    # The model gallery: more gallery indexes (files or URLs), where downloads may come from, who may install.
    galleries: Annotated[list[GallerySource], NoDecode] = Field(default_factory=list)
    gallery_cache_minutes: float = Field(60.0, ge=0, description="how long gallery indexes and base configs are kept")
    # Where `github:owner/repo/path@ref` locations are read from (a mirror of raw.githubusercontent.com may stand in).
    github_raw_url: str = "https://raw.githubusercontent.com"
    download_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts, IPs or CIDR ranges downloads may come from although private")
    gallery_file_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories file:// URIs may read")
    admin_api_key: str | None = Field(None, description="when set, only this key may install or delete models")
    responses_ttl_minutes: float = Field(60.0, gt=0, description="how long /v1/responses results are kept")
    responses_max_stored: int = Field(1000, ge=1, description="stored /v1/responses results kept at most")
    responses_max_bytes: int = Field(256 * 2**20, ge=1, description="their conversations' size kept at most")
    generated_images_ttl_minutes: float = Field(60.0, gt=0, description="how long `url` image results are kept")

    @field_validator("api_keys", "preload", "image_fetch_allow", "download_allow", "gallery_file_dirs",
                     mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("galleries", mode="before")
    @classmethod
    def _galleries(cls, value: Any) -> list[GallerySource]:
        return gallery_sources(value)

    @field_validator("models_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def load_settings(**flags: Any) -> Settings:
    """Build settings from flags (None = not given), then the environment, then defaults."""
    given = {key: value for key, value in flags.items() if value is not None and value != []}
    return Settings(**given)
