"""The `hearth models` commands: the same gallery and install code as the /models API, with a progress bar."""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import yaml

from hearth.gallery.download import DownloadError, Sources
from hearth.gallery.index import (
    GalleryEntry,
    GalleryFile,
    delete_model,
    install_entry,
    is_installed,
    load_galleries,
)
from hearth.gallery.pypi import ProgressBar
from hearth.settings import Settings

URI_PREFIXES = ("https://", "http://", "hf://", "huggingface://", "file://", "pypi:")


class CommandFailed(Exception):
    pass


def _sources(settings: Settings) -> Sources:
    return Sources.from_settings(settings)


def _entries(settings: Settings) -> dict[str, GalleryEntry]:
    try:
        return asyncio.run(load_galleries(list(settings.galleries), _sources(settings)))
    except DownloadError as exc:
        raise CommandFailed(str(exc)) from None


def installed(settings: Settings, name: str) -> bool:
    entry = _entries(settings).get(name)
    return entry is not None and is_installed(entry, settings.models_dir)


def list_available(settings: Settings) -> None:
    for entry in _entries(settings).values():
        mark = "installed" if is_installed(entry, settings.models_dir) else ""
        print(f"{entry.name:<32} {mark:<10} {entry.description}")


def install(settings: Settings, model: str, name: str | None, sha256: str | None) -> None:
    if model.startswith(URI_PREFIXES):
        filename = PurePosixPath(urlsplit(model).path if "://" in model else model.split("#", 1)[-1]).name
        try:
            entry = GalleryEntry(name=name or filename.rsplit(".", 1)[0],
                                 files=[GalleryFile(filename=filename, uri=model, sha256=sha256)],
                                 config={"parameters": {"model": filename}})
        except ValueError as exc:
            raise CommandFailed(f"cannot install {model}: {exc}") from None
    else:
        found = _entries(settings).get(model)
        if found is None:
            raise CommandFailed(f"no gallery entry '{model}'; see `hearth models list --available`")
        entry = found
    bar = ProgressBar()
    try:
        path = asyncio.run(install_entry(entry, settings.models_dir, settings.cache_dir, _sources(settings),
                                         name=name, on_progress=lambda t: bar(t.stage, t.done, t.total)))
    except (DownloadError, OSError) as exc:
        raise CommandFailed(f"installing {model} failed: {exc}") from None
    print(f"installed {path.stem} ({path})")


def remove(settings: Settings, name: str) -> None:
    from hearth.config.loader import ModelRegistry

    registry = ModelRegistry(settings.models_dir)
    config = registry.lookup(name)
    if config is None:
        raise CommandFailed(f"model '{name}' is not installed")
    try:
        removed = delete_model(config.name, settings.models_dir, registry.models())
    except DownloadError as exc:
        raise CommandFailed(str(exc)) from None
    print(f"removed {config.name}: {', '.join(removed)}")


def show(settings: Settings, name: str) -> None:
    from hearth.config.loader import ModelRegistry

    config = ModelRegistry(settings.models_dir).lookup(name)
    if config is not None:
        print(yaml.safe_dump(config.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False), end="")
        return
    entry = _entries(settings).get(name)
    if entry is None:
        raise CommandFailed(f"'{name}' is neither an installed model nor a gallery entry")
    print(yaml.safe_dump(entry.model_dump(exclude_defaults=True), sort_keys=False), end="")
