"""Galleries: YAML indexes of installable models, and installing an entry into the models directory.

An entry: `name`, `description`, `license`, `tags`, `urls`, `config` (a model YAML, inline), `url` (a base config
published at a URI, as LocalAI's galleries have: `github:owner/repo/path@branch` or https; its `config_file` and
`files` come first, the entry's own on top), `files` (`filename`, `uri` or a list of URIs joined in order,
`sha256`), `overrides` (merged into the config). The built-in gallery
holds the models that ship inside PyPI wheels (`pypi:` URIs); more galleries come from `--gallery` files or URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hearth.gallery.download import DownloadError, Sources, Transfer, download, safe_relative, target_inside
from hearth.net import FetchRefused, open_checked

log = logging.getLogger("hearth.gallery")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}")
MAX_INDEX_BYTES = 8 * 1024 * 1024


class GalleryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str
    uri: str | list[str]
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("filename")
    @classmethod
    def _plain(cls, value: str) -> str:
        try:
            safe_relative(value)
        except DownloadError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def uris(self) -> list[str]:
        return [self.uri] if isinstance(self.uri, str) else list(self.uri)


class GalleryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str = ""
    license: str = ""
    tags: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    files: list[GalleryFile] = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict)
    url: str | None = None  # a base config (LocalAI's "model config file"), fetched when the entry installs
    gallery: str = ""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(f"model name '{value}' is not allowed (letters, digits and ._+@- only)")
        return value


HUB_INDEX = Path(__file__).with_name("hub.yaml")


def builtin_entries(include_hub: bool = True) -> list[GalleryEntry]:
    """The built-in gallery: every model in hearth.gallery.builtin (pypi: URIs), then the hub models of hub.yaml."""
    from hearth.gallery.builtin import BUILTIN, config_for

    entries = []
    for model in BUILTIN.values():
        prefix = f"{model.folder}/" if model.folder else ""
        files = [GalleryFile(filename=prefix + spec.filename, sha256=spec.sha256,
                             uri=[f"pypi:{part.requirement}#{part.member}" for part in spec.parts])
                 for spec in model.files]
        entries.append(GalleryEntry(name=model.name, description=model.description, config=config_for(model),
                                    files=files, tags=list(model.config.get("known_usecases", [])),
                                    gallery="builtin"))
    if include_hub:
        entries += [entry.model_copy(update={"gallery": "builtin"})
                    for entry in parse_index(HUB_INDEX.read_text(encoding="utf-8"), "builtin")]
    return entries


def parse_index(text: str, origin: str) -> list[GalleryEntry]:
    """A gallery's entries: a YAML list of them, or one entry on its own."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DownloadError(f"gallery {origin} is not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DownloadError(f"gallery {origin} must be a YAML list of entries, or one entry")
    entries = []
    for index, item in enumerate(data):
        try:
            entries.append(GalleryEntry.model_validate({**item, "gallery": origin}))
        except (ValidationError, TypeError) as exc:
            raise DownloadError(f"gallery {origin}, entry {index}: {exc}") from None
    return entries


async def fetch_text(url: str, sources: Sources) -> str:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=30) as client:
        try:
            response = await open_checked(client, url, sources.addresses)
        except FetchRefused as exc:
            raise DownloadError(str(exc)) from None
        try:
            if response.status_code != 200:
                raise DownloadError(f"{url} answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_BYTES:
                    raise DownloadError(f"{url} is larger than {MAX_INDEX_BYTES} bytes")
            return body.decode("utf-8", errors="replace")
        finally:
            await response.aclose()


async def load_galleries(locations: list[str], sources: Sources) -> dict[str, GalleryEntry]:
    """Entries by name: the built-in gallery first, then each location (a file path or an http(s) URL)."""
    entries = {entry.name: entry for entry in builtin_entries()}
    for location in locations:
        if location.startswith(("http://", "https://")):
            text = await fetch_text(location, sources)
        else:
            try:
                text = await asyncio.to_thread(Path(location).read_text, encoding="utf-8")
            except OSError as exc:
                raise DownloadError(f"gallery {location} cannot be read: {exc}") from None
        for entry in parse_index(text, location):
            entries[entry.name] = entry
    return entries


def config_url(uri: str) -> str:
    """The https URL of a base config: LocalAI's `github:owner/repo/path/file.yaml@branch` (branch `main` when
    not given) is the file on raw.githubusercontent.com; http(s) URLs are taken as they are."""
    if uri.startswith("github:"):
        where, _, branch = uri[len("github:"):].partition("@")
        parts = where.strip("/").split("/", 2)
        if len(parts) < 3 or not all(parts) or ".." in where.split("/"):
            raise DownloadError(f"'{uri}' is not github:OWNER/REPO/PATH[@BRANCH]")
        owner, repo, path = parts
        return f"https://raw.githubusercontent.com/{owner}/{repo}/{branch or 'main'}/{path}"
    if uri.startswith(("https://", "http://")):
        return uri
    raise DownloadError(f"a base config must be at a github: or http(s) URI, not '{uri}'")


def _portable(config: dict[str, Any], origin: str) -> dict[str, Any]:
    """A LocalAI base config as Hearth uses it: its Go prompt templates are dropped (Hearth renders the model's own
    Jinja chat template), every other field is kept."""
    from hearth.chat.template import check_template

    config = dict(config)
    template = config.get("template")
    if isinstance(template, dict):
        kept = {key: value for key, value in template.items()
                if not (isinstance(value, str) and (check_template(value) or "{{." in value))}
        if len(kept) != len(template):
            log.info("base config %s: Go templates %s left out; the model's own chat template is used",
                     origin, ", ".join(sorted(set(template) - set(kept))))
        config["template"] = kept
        if not kept:
            del config["template"]
    return config


async def base_config(uri: str, sources: Sources) -> tuple[dict[str, Any], list[GalleryFile]]:
    """The config and files of a base config published at `uri` (LocalAI's gallery `url:`): a YAML mapping with
    `config_file` (a YAML string or mapping) and `files`, as LocalAI's gallery/*.yaml files are."""
    url = config_url(uri)
    text = await fetch_text(url, sources)
    try:
        data = yaml.safe_load(text)
        config = data.get("config_file") or {} if isinstance(data, dict) else None
        if isinstance(config, str):
            config = yaml.safe_load(config) or {}
    except yaml.YAMLError as exc:
        raise DownloadError(f"the base config at {url} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise DownloadError(f"the base config at {url} must be a mapping with a 'config_file' mapping")
    try:
        files = [GalleryFile.model_validate(item) for item in data.get("files") or []]
    except (ValidationError, TypeError) as exc:
        raise DownloadError(f"the base config at {url} lists a file Hearth cannot take: {exc}") from None
    return _portable(config, url), files


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in extra.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) \
            else value
    return result


def write_yaml_atomic(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(partial, path)


async def install_entry(entry: GalleryEntry, models_dir: Path, cache_dir: Path, sources: Sources,
                        overrides: dict[str, Any] | None = None, name: str | None = None,
                        on_progress: Callable[[Transfer], None] | None = None,
                        cancelled: Callable[[], bool] = lambda: False, transfer: Transfer | None = None) -> Path:
    """Download the entry's files (from the blob cache when it has them) and write its config; returns the YAML."""
    model_name = name or entry.name
    if not NAME.fullmatch(model_name):
        raise DownloadError(f"model name '{model_name}' is not allowed (letters, digits and ._+@- only)")
    models_dir.mkdir(parents=True, exist_ok=True)
    transfer = transfer if transfer is not None else Transfer()
    blobs = cache_dir / "blobs"
    base: dict[str, Any] = {}
    files = list(entry.files)
    if entry.url:
        base, more = await base_config(entry.url, sources)
        files = [*more, *(f for f in files if f.filename not in {m.filename for m in more})]
    for item in files:
        target = target_inside(models_dir, item.filename)
        blob = blobs / f"sha256-{item.sha256.lower()}" if item.sha256 else None
        if blob is not None and blob.is_file():
            from hearth.gallery.pypi import place

            await asyncio.to_thread(place, blob, target)
            transfer.done += blob.stat().st_size
            transfer.total += blob.stat().st_size
            if on_progress:
                on_progress(transfer)
            continue
        got = await download(item.uris, target, item.sha256, sources, on_progress, cancelled, transfer)
        with contextlib.suppress(OSError):  # keep a copy for later installs (a hard link: no extra space)
            blobs.mkdir(parents=True, exist_ok=True)
            if not (blobs / f"sha256-{got}").exists():
                os.link(target, blobs / f"sha256-{got}")
    config = merged(merged(merged(base, entry.config or {}), entry.overrides), overrides or {})
    config["name"] = model_name
    if not config.get("parameters", {}).get("model") and files:
        config.setdefault("parameters", {})["model"] = files[0].filename
    path = models_dir / f"{model_name}.yaml"
    write_yaml_atomic(path, config)
    return path


def is_installed(entry: GalleryEntry, models_dir: Path) -> bool:
    if not (models_dir / f"{entry.name}.yaml").is_file():
        return False
    return all((models_dir / item.filename).is_file() for item in entry.files)


def delete_model(name: str, models_dir: Path, configs: list[Any]) -> list[str]:
    """Remove a model's YAML and the files it names that no other config uses; returns what was removed."""
    from hearth.config.loader import resolve_inside

    target = next((c for c in configs if c.name == name), None)
    if target is None or not target.source_file:
        raise DownloadError(f"model '{name}' is not installed (or has no YAML of its own)")
    others = {Path(f).resolve() for c in configs if c.name != name for f in c.file_paths}
    removed = []
    root = models_dir.resolve()
    for file in target.file_paths:
        path = Path(file).resolve()
        if path == root or root not in path.parents:
            raise DownloadError(f"model '{name}' names a path that is not inside the models directory")
        if path in others or any(o.is_relative_to(path) or path.is_relative_to(o) for o in others):
            continue  # another model still uses it
        resolve_inside(models_dir, str(path.relative_to(root)), what="model")
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        removed.append(str(path.relative_to(root)))
        for sidecar in (path.with_name(path.name + ".json"),):
            if sidecar.is_file():
                sidecar.unlink()
                removed.append(sidecar.name)
    Path(target.source_file).unlink()
    removed.append(Path(target.source_file).name)
    return removed
