"""Server settings: command-line flags beat environment variables (HEARTH_*), which beat defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
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


class Settings(BaseSettings):
    """Every server setting in one place."""

    model_config = SettingsConfigDict(env_prefix="HEARTH_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    models_dir: Path = Field(default_factory=default_models_dir)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_loaded_models: int = Field(4, ge=1, description="least recently used runners are unloaded beyond this")
    idle_unload_minutes: float = Field(0, ge=0, description="unload a model unused this long; 0 keeps it")
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    runner_start_timeout: float = Field(60.0, gt=0)
    load_timeout: float = Field(600.0, gt=0)
    log_level: str = "info"
    # Images in chat requests: http(s) URLs are fetched by the server, with these limits.
    image_fetch: bool = True  # false: only data: URLs
    web: bool = True  # serve the web page at / (static files, no data of their own)
    image_fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts, IPs or CIDR ranges that may be fetched although private/loopback")
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    image_fetch_timeout: float = Field(10.0, gt=0)
    # The model gallery: more gallery indexes (files or URLs), where downloads may come from, who may install.
    galleries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    download_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts, IPs or CIDR ranges downloads may come from although private")
    gallery_file_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories file:// URIs may read")
    admin_api_key: str | None = Field(None, description="when set, only this key may install or delete models")
    responses_ttl_minutes: float = Field(60.0, gt=0, description="how long /v1/responses results are kept")
    responses_max_stored: int = Field(1000, ge=1, description="stored /v1/responses results kept at most")
    responses_max_bytes: int = Field(256 * 2**20, ge=1, description="their conversations' size kept at most")
    generated_images_ttl_minutes: float = Field(60.0, gt=0, description="how long `url` image results are kept")

    @field_validator("api_keys", "preload", "image_fetch_allow", "galleries", "download_allow", "gallery_file_dirs",
                     mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("models_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def load_settings(**flags: Any) -> Settings:
    """Build settings from flags (None = not given), then the environment, then defaults."""
    given = {key: value for key, value in flags.items() if value is not None and value != []}
    return Settings(**given)
