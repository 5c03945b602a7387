"""Loading the models directory: YAML configs, loose model files, aliases, and the checks on both."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hearth.chat.template import check_template
from hearth.config.localai import notes as localai_notes
from hearth.config.schema import (
    BACKEND_ALIASES,
    SD_PARTS_NOT_TAKEN,
    ModelConfig,
    canonical_backend,
    resolve_backend,
    sd_option_paths,
)
from hearth.config.yamlread import compose, load_yaml
from hearth.errors import ConfigError, ModelDisabled, ModelNotFound

log = logging.getLogger("hearth.config")

YAML_SUFFIXES = (".yaml", ".yml")
LOOSE_SUFFIXES = (".gguf",)
# Names of LocalAI's all-in-one set whose weights come from the Hugging Face hub, not PyPI (`hearth run --aio`):
# asking for one that is not installed says how to get it.
NOT_INSTALLABLE_HERE = {
    "stablediffusion": "it is one of LocalAI's all-in-one models: `hearth run --aio` installs it (Stable Diffusion "
                       "1.5 from the Hugging Face hub, for stable-diffusion.cpp), or `hearth models install "
                       "stablediffusion`.",
    "gpt-4-vision-preview": "it is one of LocalAI's all-in-one models: `hearth run --aio` installs a vision model "
                            "for it (SmolVLM-256M from the Hugging Face hub), or `hearth models install "
                            "smolvlm-256m-instruct`.",
}


def resolve_inside(models_dir: Path, relative: str, *, what: str = "file") -> Path:
    """The absolute path of `relative` inside `models_dir`, or ConfigError if it would leave it."""
    if not relative or "\x00" in relative:
        raise ConfigError(f"{what} path is empty or invalid")
    root = models_dir.resolve()
    candidate = Path(relative)
    if not candidate.is_absolute():
        candidate = root / candidate
    if ".." in Path(relative).parts:
        raise ConfigError(f"{what} path '{relative}' contains '..'; paths must stay inside the models directory {root}")
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{what} path '{relative}' resolves to {resolved}, outside the models directory {root}")
    return resolved


def _key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key, for pointing at the field a validation error names."""
    try:
        node = compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode):
                lines[str(key.value)] = key.start_mark.line + 1
    return lines


def _describe_validation(error: ValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    top = str(first["loc"][0]) if first["loc"] else None
    return (f"field '{loc}': {first['msg']}" if loc else first["msg"]), top


VISION_ALIASES = ("gpt-4-vision-preview", "gpt-4o")


def _has_vision_tower(folder: Path) -> bool:
    """Whether a Hugging Face folder's config.json describes an image-text-to-text model (it has a vision_config)."""
    try:
        return "vision_config" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


@dataclass
class ModelTable:
    """A consistent view of the models directory at one moment."""

    configs: dict[str, ModelConfig] = field(default_factory=dict)  # by canonical name
    names: dict[str, str] = field(default_factory=dict)  # name or alias -> canonical name
    errors: list[ConfigError] = field(default_factory=list)
    broken_names: dict[str, str] = field(default_factory=dict)  # name -> why its config was refused


class ModelRegistry:
    """The models a client can ask for, re-read when the directory changes."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._table = ModelTable()
        self._stamp: tuple[Any, ...] | None = None
        self._said: set[tuple[Any, ...]] = set()

    # -- reading ---------------------------------------------------------------------------------------

    def _directory_stamp(self) -> tuple[Any, ...]:
        try:
            entries = sorted(os.scandir(self.models_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return ()
        stamp = []
        for entry in entries:
            if entry.name.endswith(YAML_SUFFIXES + LOOSE_SUFFIXES):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                stamp.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def refresh(self, *, force: bool = False) -> ModelTable:
        with self._lock:
            stamp = self._directory_stamp()
            if force or stamp != self._stamp:
                first = self._stamp is None
                self._table = self._scan()
                self._stamp = stamp
                for problem in self._table.errors:
                    log.warning("skipping model config %s", problem)
                if first or force:
                    log.info("models directory %s: %d model(s)", self.models_dir, len(self._table.configs))
            return self._table

    def _scan(self) -> ModelTable:
        table = ModelTable()
        if not self.models_dir.is_dir():
            return table
        referenced: set[Path] = set()
        files = sorted(p for p in self.models_dir.iterdir() if p.is_file())
        for path in files:
            if path.suffix.lower() in YAML_SUFFIXES:
                for cfg in self._load_yaml(path, table):
                    self._add(table, cfg)
                    referenced.update(Path(f) for f in cfg.file_paths)
        for path in files:
            if path.suffix.lower() in LOOSE_SUFFIXES and path.resolve() not in referenced:
                try:  # the rule of YAML paths: a link that leaves the models directory is not followed
                    model_path = resolve_inside(self.models_dir, path.name, what="model")
                except ConfigError as exc:
                    table.errors.append(ConfigError(exc.reason, file=str(path)))
                    continue
                cfg = ModelConfig(name=path.stem, backend="llama-cpp", alias=[path.name])
                cfg.parameters.model = path.name
                cfg.model_path = str(model_path)
                cfg.source_file = str(path)
                self._add(table, cfg, loose=True)
        self._vision_aliases(table)
        self._draft_models(table)
        return table

    @staticmethod
    def _draft_models(table: ModelTable) -> None:
        """A `draft_model` given as an installed model's name (LocalAI allows both) names that model's file."""
        for cfg in table.configs.values():
            if cfg.draft_model and "draft_model" not in cfg.part_paths:
                other = table.configs.get(table.names.get(cfg.draft_model, ""))
                if other is not None and other.model_path:
                    cfg.part_paths = {**cfg.part_paths, "draft_model": other.model_path}

    @staticmethod
    def _vision_aliases(table: ModelTable) -> None:
        """OpenAI's vision model names, for the first installed vision model (by name) when no config claims them:
        clients written for LocalAI's all-in-one images ask for them."""
        seeing = sorted((c for c in table.configs.values() if not c.disabled and "vision" in c.usecases),
                        key=lambda c: c.name)
        if not seeing:
            return
        for alias in VISION_ALIASES:
            if alias not in table.names:
                seeing[0].alias.append(alias)
                table.names[alias] = seeing[0].name

    def _add(self, table: ModelTable, cfg: ModelConfig, *, loose: bool = False) -> None:
        for name in cfg.names:
            if name in table.names:
                if loose:
                    return
                owner = table.configs[table.names[name]].source_file
                table.errors.append(
                    ConfigError(f"model name '{name}' is already used by {owner}", file=cfg.source_file)
                )
                return
        table.configs[cfg.name] = cfg
        for name in cfg.names:
            table.names[name] = cfg.name

    def _load_yaml(self, path: Path, table: ModelTable) -> list[ModelConfig]:
        try:
            text = path.read_text(encoding="utf-8")
            documents = load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            table.errors.append(ConfigError(f"invalid YAML: {problem}", file=str(path),
                                            line=mark.line + 1 if mark else None))
            return []
        except (OSError, UnicodeDecodeError) as exc:
            table.errors.append(ConfigError(f"cannot read: {exc}", file=str(path)))
            return []
        if documents is None:
            return []
        items = documents if isinstance(documents, list) else [documents]
        lines = _key_lines(text) if not isinstance(documents, list) else {}
        configs = []
        for item in items:
            try:
                configs.append(self._validate(item, path, lines))
            except ConfigError as exc:
                table.errors.append(exc)
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    table.broken_names[item["name"]] = str(exc)
        return configs

    def _validate(self, item: Any, path: Path, lines: dict[str, int]) -> ModelConfig:
        if not isinstance(item, dict):
            raise ConfigError("a model config must be a mapping of fields", file=str(path))
        item = dict(item)
        item.setdefault("name", path.stem)
        try:
            cfg = ModelConfig.model_validate(item)
        except ValidationError as exc:
            message, top = _describe_validation(exc)
            raise ConfigError(message, file=str(path), line=lines.get(top or "")) from None
        cfg.source_file = str(path)
        cfg.model_path = None
        cfg.mmproj_path = None

        if cfg.pipeline is not None:
            if cfg.backend is not None or cfg.parameters.model:
                raise ConfigError("a realtime 'pipeline' model runs the models it names; it takes no 'backend' or "
                                  "'parameters.model' of its own", file=str(path), line=lines.get("pipeline"))
            if not cfg.pipeline.llm:
                raise ConfigError("'pipeline.llm' is required: the model that answers", file=str(path),
                                  line=lines.get("pipeline"))
            self._say_once(cfg, path)
            return cfg
        if cfg.backend is None and cfg.parameters.model and cfg.parameters.model.lower().endswith(".gguf"):
            cfg.backend = "llama-cpp"
        if cfg.backend is None:
            raise ConfigError("no backend given and none can be inferred from the model file; set 'backend:'",
                              file=str(path), line=lines.get("backend"))
        if canonical_backend(cfg.backend) is None:
            known = ", ".join(sorted(set(BACKEND_ALIASES.values())))
            raise ConfigError(f"unknown backend '{cfg.backend}'; this Hearth knows: {known}",
                              file=str(path), line=lines.get("backend"))
        if cfg.parameters.model:
            cfg.model_path = str(resolve_inside(self.models_dir, cfg.parameters.model, what="model"))
            cfg.resolved_backend = resolve_backend(cfg.backend, cfg.parameters.model,
                                                   is_dir=Path(cfg.model_path).is_dir())
        elif cfg.canonical_backend != "fake":
            raise ConfigError("'parameters.model' is required: the model file, relative to the models directory",
                              file=str(path), line=lines.get("parameters"))
        if cfg.canonical_backend == "transformers" and cfg.model_path:
            cfg.vision_tower = _has_vision_tower(Path(cfg.model_path))
        if cfg.mmproj:
            if cfg.canonical_backend != "llama-cpp":
                raise ConfigError("'mmproj' is a llama.cpp projector file; it only applies to backend llama-cpp",
                                  file=str(path), line=lines.get("mmproj"))
            cfg.mmproj_path = str(resolve_inside(self.models_dir, cfg.mmproj, what="mmproj"))
        self._part_paths(cfg, path, lines)
        if cfg.template.chat:
            problem = check_template(cfg.template.chat)
            if problem:
                raise ConfigError(f"template.chat: {problem}", file=str(path), line=lines.get("template"))
        self._say_once(cfg, path)
        return cfg

    def _part_paths(self, cfg: ModelConfig, path: Path, lines: dict[str, int]) -> None:
        """The other files a config names: stable-diffusion.cpp's parts in `options`, and a draft model given as a
        file; each must stay inside the models directory like the model itself."""
        parts: dict[str, str] = {}
        if cfg.canonical_backend == "stablediffusion-ggml":
            for key, value in sd_option_paths({"options": cfg.options}).items():
                if key in SD_PARTS_NOT_TAKEN:
                    raise ConfigError(f"options {key}: stable-diffusion-cpp-python does not take this part yet",
                                      file=str(path), line=lines.get("options"))
                try:
                    parts[key] = str(resolve_inside(self.models_dir, value, what=f"options {key}"))
                except ConfigError as exc:
                    raise ConfigError(exc.reason, file=str(path), line=lines.get("options")) from None
        if cfg.draft_model and (cfg.draft_model.lower().endswith(".gguf") or "/" in cfg.draft_model):
            try:
                parts["draft_model"] = str(resolve_inside(self.models_dir, cfg.draft_model, what="draft_model"))
            except ConfigError as exc:
                raise ConfigError(exc.reason, file=str(path), line=lines.get("draft_model")) from None
        cfg.part_paths = parts

    def _say_once(self, cfg: ModelConfig, path: Path) -> None:
        """LocalAI fields this config sets that Hearth does not act on, and unknown fields: logged once per
        config file and content, not at every re-read of the directory."""
        said, unknown = localai_notes(cfg)
        key = (str(path), cfg.name, tuple(said), tuple(unknown))
        if key in self._said:
            return
        self._said.add(key)
        if said:
            log.info("%s: model '%s' sets LocalAI fields Hearth does not use: %s", path.name, cfg.name,
                     "; ".join(said))
        for unknown_field in unknown:
            log.warning("%s: unknown field '%s' is kept but ignored", path, unknown_field)

    # -- lookups ---------------------------------------------------------------------------------------

    def models(self) -> list[ModelConfig]:
        return list(self.refresh().configs.values())

    def lookup(self, name: str) -> ModelConfig | None:
        table = self.refresh()
        canonical = table.names.get(name)
        return table.configs[canonical] if canonical else None

    def get(self, name: str, *, allow_disabled: bool = False) -> ModelConfig:
        """The config clients mean by `name`, or a ModelNotFound that says what is installed."""
        table = self.refresh()
        canonical = table.names.get(name)
        if canonical is None:
            if name in table.broken_names:
                raise ModelNotFound(
                    f"model '{name}' cannot be used: its config was refused ({table.broken_names[name]})",
                    param="model",
                )
            installed = sorted(table.names)
            listing = ", ".join(installed) if installed else "none"
            if name in NOT_INSTALLABLE_HERE:
                raise ModelNotFound(f"model '{name}' is not installed: {NOT_INSTALLABLE_HERE[name]} Installed models: "
                                    f"{listing}.", param="model")
            raise ModelNotFound(
                f"model '{name}' not found; installed models: {listing}. "
                f"Add a model config or .gguf file to {self.models_dir}, or run `hearth run` to install the defaults.",
                param="model",
            )
        cfg = table.configs[canonical]
        if cfg.disabled and not allow_disabled:
            raise ModelDisabled(f"model '{name}' is disabled in its config ({cfg.source_file})", param="model")
        return cfg
