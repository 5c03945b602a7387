"""Installing a gallery entry into the models directory, and removing an installed model.

An install downloads the entry's files (from the blob cache when it has them), unpacks archives (LocalAI's piper
voices), downloads a Hugging Face snapshot where the config names a repository instead of files, and writes the
model's YAML last, atomically: until then nothing answers under the new name, and a failure or a cancel removes
what this install had written, so the models directory is as it was. A manifest beside the YAML
(`.<stem>.installed.json`) records every file the install placed, so removing the model removes them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hearth.gallery.archive import is_archive, remove_placed, unpack
from hearth.gallery.assess import SNAPSHOT_BACKENDS, _primary_artifact, assess, hf_snapshot_repo
from hearth.gallery.catalog import combine, merged
from hearth.gallery.download import DownloadError, Sources, Transfer, download, safe_relative, target_inside
from hearth.gallery.entry import GalleryEntry, check_model_name, yaml_stem

if TYPE_CHECKING:
    from hearth.gallery.catalog import Catalog


def write_yaml_atomic(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(partial, path)


def manifest_path(yaml_path: Path) -> Path:
    return yaml_path.with_name(f".{yaml_path.stem}.installed.json")


def installed_files(yaml_path: Path, models_dir: Path) -> list[Path]:
    """The files an install recorded for this YAML (resolved, inside the models directory only)."""
    try:
        recorded = json.loads(manifest_path(yaml_path).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    root = models_dir.resolve()
    found = []
    for item in recorded if isinstance(recorded, list) else []:
        with contextlib.suppress(DownloadError, TypeError):
            path = (root / safe_relative(str(item))).resolve()
            if path.is_relative_to(root) and path != root:
                found.append(path)
    return found


def install_name(entry: GalleryEntry, name: str | None, overrides: dict[str, Any]) -> str:
    """The name the installed model answers to: the one asked for, else the overrides' (LocalAI lets them rename
    a model), else the entry's."""
    for candidate in (name, overrides.get("name")):
        if candidate:
            try:
                return check_model_name(candidate)
            except ValueError as exc:
                raise DownloadError(f"model name {candidate!r} is not allowed: {exc}") from None
    return entry.install_name


async def install_entry(entry: GalleryEntry, models_dir: Path, cache_dir: Path, sources: Sources,
                        overrides: dict[str, Any] | None = None, name: str | None = None,
                        on_progress: Callable[[Transfer], None] | None = None,
                        cancelled: Callable[[], bool] = lambda: False, transfer: Transfer | None = None,
                        catalog: Catalog | None = None, notes: list[str] | None = None) -> Path:
    """Install `entry` (its base config read through `catalog`); returns the YAML written. `notes` collects what a
    user should know about the install (files installed unchecked, parts left out)."""
    notes = notes if notes is not None else []
    transfer = transfer if transfer is not None else Transfer()
    overrides = overrides or {}
    if entry.url:
        if catalog is None:
            raise DownloadError(f"'{entry.name}' names a base config ({entry.url}) and no gallery reader was given")
        config, files = await catalog.resolve(entry)
    else:
        config, files = combine(entry, None)
    config = merged(config, overrides)
    model_name = install_name(entry, name, overrides)
    verdict = assess(config, files)
    if not verdict.usable:
        raise DownloadError(f"'{entry.name}' cannot be installed here: {verdict.reason}")
    models_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = models_dir / f"{yaml_stem(model_name)}.yaml"
    created: list[Path] = []
    made_dirs: list[Path] = []  # folders this install made, taken away again (if empty) when it fails
    try:
        for item in files:
            target = target_inside(models_dir, item.filename)
            made_dirs += _missing_folders(target.parent, models_dir)
            fresh = not target.exists()
            if item.sha256 is None:
                notes.append(f"{item.filename}: the gallery gives no sha256, so it was installed unchecked")
            await _fetch(item.uris, item.sha256, target, cache_dir, sources, on_progress, cancelled, transfer)
            if fresh:
                created.append(target)
            if is_archive(item.filename):
                placed = await asyncio.to_thread(unpack, target, target.parent)
                created += placed
                notes.append(f"{item.filename}: unpacked ({len(placed)} files)")
                target.unlink()
                if target in created:
                    created.remove(target)
        parameters = config.setdefault("parameters", {})
        repo = hf_snapshot_repo(config, files) if verdict.hearth_backend in SNAPSHOT_BACKENDS else None
        if repo:
            folder_name = f"huggingface/{repo}"
            folder = target_inside(models_dir, folder_name)
            made_dirs += _missing_folders(folder, models_dir)
            artifact = _primary_artifact(config) or {}
            source = artifact.get("source", {}) if isinstance(artifact.get("source"), dict) else {}
            from hearth.gallery.hfhub import snapshot

            written: list[Path] = []
            try:
                commit = await snapshot(repo, str(source.get("revision") or "main"), folder, sources, transfer,
                                        written, on_progress, cancelled, _patterns(source.get("allow_patterns")),
                                        _patterns(source.get("ignore_patterns")))
            finally:
                created += [p for p in written if p not in created]
                made_dirs += [p for w in written for p in _missing_folders(w.parent, models_dir, after=True)]
            parameters["model"] = folder_name
            config.pop("artifacts", None)
            notes.append(f"downloaded {repo} at commit {commit[:12]} ({len(written)} files)")
        elif not parameters.get("model") and files:
            parameters["model"] = files[0].filename
        config["name"] = model_name
        if cancelled():
            raise DownloadError("cancelled")
        root = models_dir.resolve()
        recorded = sorted({str(p.resolve().relative_to(root)) for p in created if p.resolve().is_relative_to(root)})
        previous = [str(p.relative_to(root)) for p in installed_files(yaml_path, models_dir)]
        manifest = {"name": model_name, "entry": entry.name, "gallery": entry.gallery,
                    "files": sorted({*recorded, *previous, *(f.filename for f in files if not is_archive(f.filename))})}
        manifest_path(yaml_path).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        write_yaml_atomic(yaml_path, config)
    except BaseException:
        await asyncio.to_thread(remove_placed, list(reversed(created)))
        _prune_empty(models_dir, set(made_dirs))
        raise
    return yaml_path


def _missing_folders(folder: Path, models_dir: Path, after: bool = False) -> list[Path]:
    """`folder` and its parents inside the models directory that do not exist yet (with `after`: that exist now,
    made by a download that went below `folder`'s first missing parent; the caller records them either way)."""
    root = models_dir.resolve()
    found = []
    current = folder.resolve()
    while current != root and current.is_relative_to(root):
        if after or not current.exists():
            found.append(current)
        current = current.parent
    return found


def _patterns(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) and value else None


async def _fetch(uris: list[str], sha256: str | None, target: Path, cache_dir: Path, sources: Sources,
                 on_progress: Callable[[Transfer], None] | None, cancelled: Callable[[], bool],
                 transfer: Transfer) -> None:
    """One file: from the blob cache when a checksum names it there, else downloaded (and then kept in the cache,
    as a hard link: no extra space)."""
    blobs = cache_dir / "blobs"
    blob = blobs / f"sha256-{sha256}" if sha256 else None
    if blob is not None and blob.is_file():
        from hearth.gallery.pypi import place

        await asyncio.to_thread(place, blob, target)
        transfer.stage = f"{target.name} (from the cache)"
        transfer.done += blob.stat().st_size
        transfer.total += blob.stat().st_size
        if on_progress:
            on_progress(transfer)
        return
    got = await download(uris, target, sha256, sources, on_progress, cancelled, transfer)
    with contextlib.suppress(OSError):
        blobs.mkdir(parents=True, exist_ok=True)
        if not (blobs / f"sha256-{got}").exists():
            os.link(target, blobs / f"sha256-{got}")


def is_installed(entry: GalleryEntry, models_dir: Path) -> bool:
    """Whether the entry's model is in the models directory under the name it installs as."""
    yaml_path = models_dir / f"{yaml_stem(entry.install_name)}.yaml"
    if not yaml_path.is_file():
        return False
    recorded = installed_files(yaml_path, models_dir)
    if recorded:
        return all(path.exists() for path in recorded)
    return all((models_dir / item.filename).is_file() for item in entry.files if not is_archive(item.filename))


def delete_model(name: str, models_dir: Path, configs: list[Any]) -> list[str]:
    """Remove a model's YAML and the files it uses or its install placed that no other model uses; returns what was
    removed."""
    from hearth.config.loader import resolve_inside

    target = next((c for c in configs if c.name == name), None)
    if target is None or not target.source_file:
        raise DownloadError(f"model '{name}' is not installed (or has no YAML of its own)")
    root = models_dir.resolve()

    def used_by(config: Any) -> list[Path]:
        paths = [Path(f).resolve() for f in config.file_paths]
        if config.source_file and Path(config.source_file).suffix in (".yaml", ".yml"):
            paths += installed_files(Path(config.source_file), models_dir)
        return list(dict.fromkeys(paths))

    others = {p for c in configs if c.name != name and c.source_file != target.source_file for p in used_by(c)}
    removed = []
    mine = sorted(used_by(target), key=lambda p: len(p.parts), reverse=True)  # files before their folders
    for path in mine:
        if path == root or root not in path.parents:
            raise DownloadError(f"model '{name}' names a path that is not inside the models directory")
        if path in others or any(o.is_relative_to(path) or path.is_relative_to(o) for o in others):
            continue  # another model still uses it
        resolve_inside(models_dir, str(path.relative_to(root)), what="model")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(str(path.relative_to(root)))
        sidecar = path.with_name(path.name + ".json")
        if sidecar.is_file() and sidecar not in others:
            sidecar.unlink()
            removed.append(str(sidecar.relative_to(root)))
    source = Path(target.source_file)
    if source.suffix in (".yaml", ".yml"):
        with contextlib.suppress(FileNotFoundError):
            manifest_path(source).unlink()
    if source.exists():  # a loose .gguf is its own source, removed above
        source.unlink()
        removed.append(source.name)
    _prune_empty(models_dir, {p.parent for p in mine})
    return removed


def _prune_empty(models_dir: Path, folders: set[Path]) -> None:
    """Folders an install made that removing the model left empty (`huggingface/owner/name`, `llama-cpp/models/`)."""
    root = models_dir.resolve()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
