"""The model YAML schema, with LocalAI's field names; unknown fields are kept, not rejected."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Hearth's backends, by canonical name, with the LocalAI spellings that mean the same one.
BACKEND_ALIASES: dict[str, str] = {
    "llama-cpp": "llama-cpp",
    "llama.cpp": "llama-cpp",
    "llama": "llama-cpp",
    "llamacpp": "llama-cpp",
    "sentencetransformers": "sentencetransformers",
    "sentence-transformers": "sentencetransformers",
    "sentence_transformers": "sentencetransformers",
    "rerankers": "sentencetransformers",
    "faster-whisper": "faster-whisper",
    "whisper": "faster-whisper",
    "piper": "piper",
    "transformers": "transformers",
    "diffusers": "diffusers",
    "stablediffusion-ggml": "stablediffusion-ggml",
    "stablediffusion-cpp": "stablediffusion-ggml",
    "sd-cpp": "stablediffusion-ggml",
    "huggingface": "transformers",
    "fake": "fake",
}

# What each backend serves (LocalAI's known_usecases words), before a runner confirms it at load time.
BACKEND_USECASES: dict[str, list[str]] = {
    "llama-cpp": ["chat", "completion"],
    "sentencetransformers": ["embeddings", "rerank"],
    "faster-whisper": ["transcript"],
    "piper": ["tts"],
    "transformers": ["chat", "completion"],
    "diffusers": ["image"],
    "stablediffusion-ggml": ["image"],
    "fake": ["chat", "completion"],
}


def canonical_backend(name: str) -> str | None:
    return BACKEND_ALIASES.get(name.strip().lower())


class _Open(BaseModel):
    """A block that keeps fields it does not know."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unknown_fields(self, prefix: str = "") -> list[str]:
        found = [f"{prefix}{key}" for key in (self.model_extra or {})]
        for name, value in self:
            if isinstance(value, _Open):
                found += value.unknown_fields(f"{prefix}{name}.")
        return found


class Parameters(_Open):
    """`parameters:` — the model file and default sampling values."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    seed: int | None = None
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    typical_p: float | None = Field(None, gt=0, le=1)
    repeat_last_n: int | None = Field(None, ge=0, le=2**31 - 1)


class TemplateConfig(_Open):
    """`template:` — Hearth reads `chat` as a Jinja chat template (HF style, `messages` in scope)."""

    chat: str | None = None


class FunctionGrammarConfig(_Open):
    """`function.grammar:` (LocalAI's block)."""

    # Do not constrain forced tool calls (tool_choice required or named) with a grammar.
    disable: bool = False


class FunctionConfig(_Open):
    """`function:` — how the model calls tools (LocalAI's block, where it maps)."""

    # hermes, llama3, mistral or json; unset: chosen from the chat template.
    tool_format: Literal["hermes", "llama3", "mistral", "json"] | None = None
    function_name_key: str = Field("name", min_length=1)
    function_arguments_key: str = Field("arguments", min_length=1)
    grammar: FunctionGrammarConfig = Field(default_factory=FunctionGrammarConfig)


class ModelConfig(_Open):
    """One model: what clients call it, which backend runs it, and its files and defaults."""

    name: str
    backend: str | None = None
    parameters: Parameters = Field(default_factory=Parameters)
    context_size: int | None = Field(None, ge=16, le=2**31 - 1)
    threads: int | None = Field(None, ge=1, le=1024)
    parallel: int | None = Field(None, ge=1, le=64)
    queue_size: int | None = Field(None, ge=0, le=100_000)
    flash_attention: bool | None = None
    # LocalAI's field: llama-cpp maps the weights from the file instead of reading them into memory; unset: read
    # in when they take at most half the available memory (they decode faster so), mapped when larger.
    mmap: bool | None = None
    # llama-cpp: streamed text is sent at most this often (the first text and the end at once); 0: every token.
    stream_interval_ms: float | None = Field(None, ge=0, le=1000)
    # Embedding models (LocalAI's `embeddings`): a llama-cpp model serves /v1/embeddings instead of generating.
    embeddings: bool = False
    mmproj: str | None = None  # LocalAI's field: a llama.cpp multimodal projector file (vision)
    truncate: bool = False  # cut inputs longer than the model's limit instead of refusing them (400)
    reduce_dimensions: bool = False  # allow `dimensions`: truncate vectors and normalise them again
    similarity_rerank: bool = True  # an embeddings model also reranks by cosine similarity
    # host:port of a runner started by hand (`python -m hearth.runner --listen HOST:PORT`); unset: Hearth starts one.
    runner: str | None = None
    stopwords: list[str] = Field(default_factory=list)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    function: FunctionConfig = Field(default_factory=FunctionConfig)
    alias: list[str] = Field(default_factory=list)
    disabled: bool = False
    description: str = ""
    known_usecases: list[str] = Field(default_factory=list)
    # Options of the deterministic test backend (see backends/fake.py).
    fake: dict[str, Any] | None = None

    # Filled by the loader, never read from YAML.
    source_file: str | None = Field(None, exclude=True)
    model_path: str | None = Field(None, exclude=True)
    mmproj_path: str | None = Field(None, exclude=True)
    vision_tower: bool = Field(False, exclude=True)  # a transformers folder whose config.json has a vision_config

    @property
    def usecases(self) -> list[str]:
        """What the model is for: its YAML's known_usecases, else what its backend serves."""
        if self.known_usecases:
            found = list(self.known_usecases)
        elif self.canonical_backend == "llama-cpp" and self.embeddings:
            found = ["embeddings", "rerank"] if self.similarity_rerank else ["embeddings"]
        else:
            found = list(BACKEND_USECASES.get(self.canonical_backend, []))
        if "vision" not in found and (self.mmproj or self.vision_tower):
            found.append("vision")
        return found

    @property
    def file_paths(self) -> list[str]:
        """The resolved files this model uses: its weights and, for vision GGUFs, the projector."""
        return [p for p in (self.model_path, self.mmproj_path) if p]

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("name must not be empty")
        if len(value) > 256:
            raise ValueError("name is longer than 256 characters")
        if any(ord(ch) < 32 for ch in value):
            raise ValueError("name contains control characters")
        return value

    @field_validator("alias", "stopwords", "known_usecases", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("runner")
    @classmethod
    def _runner_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(unix:/\S+|[\w.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5})", value):
            raise ValueError("runner must be host:port, [ipv6]:port or unix:/path")
        return value

    @property
    def names(self) -> list[str]:
        return [self.name, *self.alias]

    @property
    def canonical_backend(self) -> str:
        return canonical_backend(self.backend or "") or ""
