"""Whether Hearth can run a gallery entry: a backend it has, a config it accepts, and files that backend loads.

This is read from the entry alone (its config with the base config under it, and its file list), without
downloading anything, so a gallery of thousands of entries is assessed in a moment; the same judgement lists
entries as available or not (with the reason) and counts LocalAI's gallery in `benchmarks/localai_gallery.py`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from hearth.backends.base import BACKEND_MODULES
from hearth.config.schema import (
    BACKEND_ALIASES,
    SD_PARTS_NOT_TAKEN,
    ModelConfig,
    resolve_backend,
    sd_option_paths,
)
from hearth.gallery.entry import GalleryFile

log = logging.getLogger("hearth.gallery")

HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
ARCHIVES = (".tar.gz", ".tgz", ".tar")
CHECKPOINTS = (".gguf", ".safetensors", ".ckpt", ".sft", ".pth", ".pt", ".bin")
SNAPSHOT_BACKENDS = ("diffusers", "transformers", "sentencetransformers", "faster-whisper")


@dataclass
class Assessment:
    backend: str  # as the entry names it (LocalAI's word), "" when it names none
    usable: bool
    reason: str | None = None
    hearth_backend: str = ""  # the Hearth backend that runs it


def is_hf_repo(value: str) -> bool:
    """`owner/name`, as a Hugging Face repo id is written (not a path with a file extension of a model)."""
    return bool(HF_REPO.fullmatch(value)) and not value.lower().endswith((*CHECKPOINTS, ".onnx", ".yaml"))


def _go_template(value: Any) -> bool:
    from hearth.chat.template import check_template

    return isinstance(value, str) and ("{{." in value or "{{-." in value or check_template(value) is not None)


def portable(config: dict[str, Any]) -> dict[str, Any]:
    """A LocalAI config as Hearth uses it: its Go prompt templates are left out (Hearth renders the model's own Jinja
    chat template), every other field is kept."""
    template = config.get("template")
    if not isinstance(template, dict):
        return config
    kept = {key: value for key, value in template.items() if not _go_template(value)}
    if len(kept) == len(template):
        return config
    result = dict(config)
    if kept:
        result["template"] = kept
    else:
        result.pop("template")
    return result


def _primary_artifact(config: dict[str, Any]) -> dict[str, Any] | None:
    """LocalAI's `artifacts:` entry for the model itself (a Hugging Face repo), when the config has one."""
    artifacts = config.get("artifacts")
    if not isinstance(artifacts, list):
        return None
    for item in artifacts:
        if isinstance(item, dict) and item.get("target", "model") == "model" and isinstance(item.get("source"), dict):
            return item
    return None


def hf_snapshot_repo(config: dict[str, Any], files: list[GalleryFile]) -> str | None:
    """The Hugging Face repo a snapshot install downloads for this config: its primary artifact's, or
    `parameters.model` when that is a repo id rather than one of the entry's files."""
    artifact = _primary_artifact(config)
    if artifact is not None and artifact["source"].get("type", "huggingface") == "huggingface":
        repo = str(artifact["source"].get("repo") or "")
        return repo if HF_REPO.fullmatch(repo) else None
    model = (config.get("parameters") or {}).get("model")
    if isinstance(model, str) and is_hf_repo(model) and not _provided(model, files):
        return model
    if isinstance(model, str) and re.fullmatch(r"[\w.-]+", model) and not _provided(model, files) and \
            str(config.get("backend", "")).lower() in ("sentencetransformers", "sentence-transformers"):
        return f"sentence-transformers/{model}"  # as sentence-transformers itself reads a bare model name
    return None


def _provided(path: str, files: list[GalleryFile]) -> bool:
    """Whether the entry's files make `path`: the file itself, or a folder they go into."""
    return any(f.filename == path or f.filename.startswith(path.rstrip("/") + "/") for f in files)


def _suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in ARCHIVES if lower.endswith(s)), PurePosixPath(lower).suffix)


def assess(config: dict[str, Any], files: list[GalleryFile]) -> Assessment:
    """Can Hearth run this config with these files? (See the module docstring.)"""
    parameters = config.get("parameters") if isinstance(config.get("parameters"), dict) else {}
    model = parameters.get("model")
    model = model if isinstance(model, str) else (files[0].filename if files and model is None else None)
    named = config.get("backend")
    named = str(named) if named else ""
    if not named and model and model.lower().endswith(".gguf"):
        named = "llama-cpp"
    if not named and isinstance(config.get("pipeline"), dict) and not files:
        return Assessment(backend="", usable=True)  # a realtime pipeline: made of other models, run by none
    if not named:
        return Assessment(backend="", usable=False, reason="it names no backend and none follows from its model file")
    backend = resolve_backend(named, model or "", is_dir=bool(model) and not _file_named(model, files))
    if backend is None or backend not in BACKEND_MODULES:
        known = ", ".join(sorted(set(BACKEND_ALIASES.values()) & set(BACKEND_MODULES) - {"fake"}))
        return Assessment(backend=named, usable=False,
                          reason=f"backend '{named}' is not one Hearth has (it has: {known})")
    try:
        ModelConfig.model_validate({**config, "name": "x", "backend": named})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return Assessment(backend=named, usable=False, reason=f"its config is refused: {where}: {first['msg']}",
                          hearth_backend=backend)
    problem = _use_problem(backend, config) or _files_problem(backend, config, model, files)
    return Assessment(backend=named, usable=problem is None, reason=problem, hearth_backend=backend)


def _use_problem(backend: str, config: dict[str, Any]) -> str | None:
    """Why Hearth's backend of that name cannot do what this entry is for (LocalAI's backends of the same names do
    more: video pipelines, text to speech with transformers, OpenVINO models, ColBERT scoring)."""
    uses = config.get("known_usecases")
    uses = {str(u).lower() for u in uses} if isinstance(uses, list) else {str(uses).lower()} if uses else set()
    kind = str(config.get("type") or "")
    pipeline = str((config.get("diffusers") or {}).get("pipeline_type") or "") \
        if isinstance(config.get("diffusers"), dict) else ""
    if backend == "stablediffusion-ggml":
        if "video" in uses:
            return "a video model; Hearth's stable-diffusion.cpp backend makes images"
        missing = [key for key in sd_option_paths(config) if key in SD_PARTS_NOT_TAKEN]
        if missing:
            return f"it needs {', '.join(missing)}, a part stable-diffusion-cpp-python does not take yet"
    if backend == "diffusers":
        if "video" in uses or "Video" in pipeline:
            return "a video pipeline; Hearth's diffusers backend makes images"
        if "Upscale" in pipeline:
            return "an upscaler, which needs an input image; Hearth's diffusers backend makes images from text"
    if backend == "transformers":
        if kind.startswith("OV"):
            return f"an OpenVINO model ({kind}); Hearth's transformers backend runs PyTorch models"
        if uses and not uses & {"chat", "completion", "vision"}:
            return (f"for {', '.join(sorted(uses))}; Hearth's transformers backend runs chat and vision models "
                    f"(use a backend made for that)")
    if backend == "sentencetransformers" and kind.lower() == "colbert":
        return "ColBERT late-interaction scoring, which Hearth's rerankers do not do"
    return None


def _file_named(path: str, files: list[GalleryFile]) -> bool:
    return any(f.filename == path for f in files)


def _files_problem(backend: str, config: dict[str, Any], model: str | None,
                   files: list[GalleryFile]) -> str | None:
    """Why the files cannot be loaded by `backend`, or None when they can."""
    if backend == "fake":
        return None
    if backend in SNAPSHOT_BACKENDS and hf_snapshot_repo(config, files):
        return None
    if not model:
        return "it names no model file (parameters.model) and lists no files"
    suffix = _suffix(model)
    if backend == "piper":
        if suffix != ".onnx":
            return f"a Piper voice is an .onnx file, not {model}"
        if _file_named(model, files) or any(_suffix(f.filename) in ARCHIVES for f in files):
            return None
        return f"parameters.model names {model}, which neither its files nor a voice archive among them provide"
    if not _provided(model, files):
        return f"parameters.model names {model}, which the entry does not download"
    if backend == "llama-cpp":
        for role, path in (("the model", model), ("mmproj", config.get("mmproj"))):
            if isinstance(path, str) and path and _suffix(path) != ".gguf":
                return f"llama.cpp loads GGUF files; {role} is {path}"
            if isinstance(path, str) and path and not _provided(path, files):
                return f"{role} names {path}, which the entry does not download"
        return None
    if backend == "whisper-cpp":
        return None if suffix == ".bin" else f"whisper.cpp loads ggml .bin files, not {model}"
    if backend == "stablediffusion-ggml":
        if suffix not in CHECKPOINTS:
            return f"stable-diffusion.cpp loads .gguf, .safetensors or .ckpt files, not {model}"
        for key, path in sd_option_paths(config).items():
            if not _provided(path, files):
                return f"options {key} names {path}, which the entry does not download"
        return None
    if backend == "silero-vad":
        return None if suffix == ".onnx" else f"Silero VAD is an .onnx file, not {model}"
    return None  # a folder or file the entry downloads, for a backend that reads folders
