"""A gallery entry, read as LocalAI reads its galleries: the fields, their spellings, and what they may hold.

An entry: `name`, `description`, `license`, `tags`, `urls`, `icon`, `url` (a base config published at a URI:
`github:owner/repo/path@ref` or https), `config_file` (LocalAI's inline base config, a mapping or a YAML string),
`config` (Hearth's name for the same), `files` (`filename`, `uri` or a list of URIs joined in order, `sha256`), and
`overrides` (merged over the config). Other fields (`variants`, `last_checked`, `size`, …) are kept and ignored.

LocalAI's spellings are taken as LocalAI takes them: `sha256: ""` means no checksum, and a model's name is any
text (`llama-3.2-1b-instruct:q4_k_m`, non-ASCII letters): it is never used as a path; `yaml_stem` gives the file
name its YAML is written under.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hearth.config.yamlread import load_yaml
from hearth.gallery.download import DownloadError, safe_relative

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}")
MAX_NAME = 256


def check_model_name(value: Any) -> str:
    """A model name as LocalAI allows it: any text but empty, over-long or with control characters."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("the name must be text")
    text = str(value).strip()
    if not text:
        raise ValueError("the name is empty")
    if len(text) > MAX_NAME:
        raise ValueError(f"the name is longer than {MAX_NAME} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise ValueError("the name contains control characters")
    return text


def yaml_stem(name: str) -> str:
    """The file name (without .yaml) a model's config is written under: the name itself when it is a plain file name,
    else a plain spelling of it with a short hash of the whole name, so two names never share a file."""
    if PLAIN_NAME.fullmatch(name) and not name.startswith("."):
        return name
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    plain = re.sub(r"[^A-Za-z0-9._+@-]+", "-", folded).strip("-.")[:100] or "model"
    return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class GalleryFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    filename: str
    uri: str | list[str]
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("filename")
    @classmethod
    def _plain(cls, value: str) -> str:
        try:
            safe_relative(value)
        except DownloadError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _checksum(cls, value: Any) -> Any:
        """LocalAI's `sha256: ""` (and a missing one): no checksum to check."""
        if value is None:
            return None
        if isinstance(value, str):
            return value.strip().lower() or None
        raise ValueError("sha256 must be text: 64 hexadecimal digits")

    @field_validator("uri")
    @classmethod
    def _some_uri(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError("the file has no uri")
        return value

    @property
    def uris(self) -> list[str]:
        return [self.uri] if isinstance(self.uri, str) else list(self.uri)


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # LocalAI's config_file is often a YAML string
        try:
            value = load_yaml(value) or {}
        except Exception as exc:  # yaml.YAMLError and friends: the message says where
            raise ValueError(f"{field} is not valid YAML: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a mapping")
    return value


class GalleryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str = ""
    license: str = ""
    icon: str = ""
    tags: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)  # merged from LocalAI's `config_file` too
    files: list[GalleryFile] = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict)
    url: str | None = None  # a base config (LocalAI's "model config file"), fetched when the entry installs
    gallery: str = ""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        return check_model_name(value)

    @field_validator("description", "license", "icon", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        return "" if value is None else str(value)

    @field_validator("tags", "urls", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ValueError("must be a list")
        return [str(item) for item in value if item is not None]

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        return value or None

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides(cls, value: Any) -> dict[str, Any]:
        return _mapping(value, "overrides")

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, value: Any) -> Any:
        return [] if value is None else value

    @classmethod
    def from_raw(cls, item: Any, gallery: str) -> GalleryEntry:
        """An entry from an index: LocalAI's inline `config_file` is the config (Hearth's `config` on top)."""
        if not isinstance(item, dict):
            raise ValueError("an entry must be a mapping of fields")
        data = dict(item)
        inline = _mapping(data.pop("config_file", None), "config_file")
        own = _mapping(data.pop("config", None), "config")
        data["config"] = {**inline, **own}
        data["gallery"] = gallery
        return cls.model_validate(data)

    @classmethod
    def for_file(cls, uri: str, name: str | None = None, sha256: str | None = None) -> GalleryEntry:
        """An entry of one model file given by its URI (named after the file unless `name` says); ValueError when
        the URI ends in no usable file name."""
        filename = PurePosixPath(urlsplit(uri).path if "://" in uri else uri.split("#", 1)[-1]).name
        if not filename:
            raise ValueError("the URI does not end in a file name")
        return cls(name=name or filename.rsplit(".", 1)[0], files=[GalleryFile(filename=filename, uri=uri,
                                                                                sha256=sha256)],
                   config={"parameters": {"model": filename}})

    @property
    def install_name(self) -> str:
        """The name the model answers to once installed: LocalAI lets `overrides.name` rename it."""
        renamed = self.overrides.get("name")
        try:
            return check_model_name(renamed) if renamed is not None else self.name
        except ValueError:
            return self.name
