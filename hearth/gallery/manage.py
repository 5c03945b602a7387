"""The `hearth models` commands: the same gallery and install code as the /models API, with a progress bar."""

from __future__ import annotations

import asyncio
import sys

import yaml

from hearth.gallery.catalog import Catalog, Listing
from hearth.gallery.download import DownloadError
from hearth.gallery.entry import GalleryEntry
from hearth.gallery.install import delete_model, install_entry, is_installed
from hearth.gallery.pypi import ProgressBar
from hearth.settings import Settings

URI_PREFIXES = ("https://", "http://", "hf://", "huggingface://", "file://", "pypi:")


class CommandFailed(Exception):
    pass


def _listing(settings: Settings) -> Listing:
    listing = asyncio.run(Catalog(settings).listing())
    for problem in listing.errors():
        print(f"hearth: {problem}", file=sys.stderr)
    return listing


def installed(settings: Settings, name: str, catalog: Catalog | None = None) -> bool:
    found = (asyncio.run((catalog or Catalog(settings)).listing())).find(name)
    return found is not None and found.entry is not None and is_installed(found.entry, settings.models_dir)


def list_available(settings: Settings) -> None:
    listing = _listing(settings)
    unavailable = 0
    for item in listing.items:
        if item.entry is not None and item.available:
            mark = "installed" if is_installed(item.entry, settings.models_dir) else ""
            summary = (item.entry.description.strip().splitlines() or [""])[0][:100]
            print(f"{item.name:<40} {mark:<10} {summary}")
        else:
            unavailable += 1
            print(f"{item.name:<40} {'cannot':<10} {item.assessment.reason}")
    if unavailable:
        print(f"{unavailable} of {len(listing.items)} entries cannot be installed here (reasons above)",
              file=sys.stderr)


def install(settings: Settings, model: str, name: str | None, sha256: str | None,
            catalog: Catalog | None = None) -> None:
    catalog = catalog or Catalog(settings)
    if model.startswith(URI_PREFIXES):
        try:
            entry = GalleryEntry.for_file(model, name, sha256)
        except ValueError as exc:
            raise CommandFailed(f"cannot install {model}: {exc}") from None
    else:
        listing = asyncio.run(catalog.listing())
        found = listing.find(model)
        if found is None:
            errors = "; ".join(listing.errors())
            raise CommandFailed(f"no gallery entry '{model}'; see `hearth models list --available`"
                                + (f" (and: {errors})" if errors else ""))
        if found.entry is None or not found.available:
            raise CommandFailed(f"'{model}' cannot be installed here: {found.assessment.reason}")
        entry = found.entry
    bar = ProgressBar()
    notes: list[str] = []
    try:
        path = asyncio.run(install_entry(entry, settings.models_dir, settings.cache_dir, catalog.sources, name=name,
                                         on_progress=lambda t: bar(t.stage, t.done, t.total), catalog=catalog,
                                         notes=notes))
    except (DownloadError, OSError) as exc:
        raise CommandFailed(f"installing {model} failed: {exc}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
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
        print(yaml.safe_dump(config.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False,
                             allow_unicode=True), end="")
        return
    found = _listing(settings).find(name)
    if found is None or found.entry is None:
        raise CommandFailed(f"'{name}' is neither an installed model nor a gallery entry")
    print(yaml.safe_dump(found.entry.model_dump(exclude_defaults=True), sort_keys=False, allow_unicode=True), end="")
    if not found.available:
        print(f"# cannot be installed here: {found.assessment.reason}")
