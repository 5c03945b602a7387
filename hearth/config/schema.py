"""The model YAML schema, with LocalAI's field names; unknown fields are kept, not rejected."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hearth.config.speculation import Speculation, speculation_from

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
    "whisper": "faster-whisper",  # LocalAI's whisper is whisper.cpp: a ggml .bin file goes there (resolve_backend)
    "whisper-cpp": "whisper-cpp",
    "whispercpp": "whisper-cpp",
    "whisper.cpp": "whisper-cpp",
    "piper": "piper",
    "silero-vad": "silero-vad",
    "silero": "silero-vad",
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
    "whisper-cpp": ["transcript"],
    "piper": ["tts"],
    "silero-vad": ["vad"],
    "transformers": ["chat", "completion"],
    "diffusers": ["image"],
    "stablediffusion-ggml": ["image"],
    "fake": ["chat", "completion"],
}


def canonical_backend(name: str) -> str | None:
    return BACKEND_ALIASES.get(name.strip().lower())


def resolve_backend(name: str, model: str, *, is_dir: bool) -> str | None:
    """The backend that runs `model`: LocalAI's `whisper` is whisper.cpp for a ggml `.bin` file and faster-whisper
    for a CTranslate2 folder; every other name is its alias."""
    canonical = canonical_backend(name)
    if name.strip().lower() == "whisper" and not is_dir and model.lower().endswith(".bin"):
        return "whisper-cpp"
    return canonical


# llama.cpp's KV cache types, as llama-server's --cache-type-k names them.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# stable-diffusion.cpp's parts, as LocalAI passes them in `options` ("vae_path:ae.safetensors"): every `*_path`
# option names a file relative to the models directory. The first are those stable-diffusion-cpp-python (pinned)
# takes; the others (Ideogram's unconditional model, LTX's audio parts) it has no place for yet.
SD_PATH_OPTIONS = ("diffusion_model_path", "vae_path", "llm_path", "llm_vision_path", "t5xxl_path", "clip_l_path",
                   "clip_g_path", "clip_vision_path", "taesd_path", "high_noise_diffusion_model_path",
                   "control_net_path")
SD_PARTS_NOT_TAKEN = ("uncond_diffusion_model_path", "audio_vae_path", "embeddings_connectors_path")


def parse_options(options: list[Any]) -> dict[str, str | bool]:
    """LocalAI's `options` list ("key:value", or a bare "key" meaning on) as a mapping; the value keeps any further
    colons (`rpc_servers:host:port`)."""
    parsed: dict[str, str | bool] = {}
    for item in options:
        key, sep, value = str(item).partition(":")
        if key.strip():
            parsed[key.strip()] = value.strip() if sep else True
    return parsed


def sd_option_paths(config: dict[str, Any]) -> dict[str, str]:
    """The files a stable-diffusion.cpp config's options name, by option."""
    options = config.get("options")
    found = parse_options(options) if isinstance(options, list) else {}
    return {key: value for key, value in found.items()
            if key in (*SD_PATH_OPTIONS, *SD_PARTS_NOT_TAKEN) and isinstance(value, str) and value}


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

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k_off(cls, value: Any) -> Any:
        """llama.cpp's (and LocalAI's) `top_k: -1`: off, which is 0 here."""
        return 0 if _number(value) and value < 0 else value

    @field_validator("seed", "repeat_last_n", mode="before")
    @classmethod
    def _negative_off(cls, value: Any) -> Any:
        """LocalAI's `seed: -1` (random) and `repeat_last_n: -1`: as if not set."""
        return None if _number(value) and value < 0 else value

    @field_validator("max_tokens", "typical_p", mode="before")
    @classmethod
    def _zero_off(cls, value: Any) -> Any:
        """LocalAI's `max_tokens: 0` or -1 (no limit of its own) and `typical_p: 0`: as if not set."""
        return None if _number(value) and value <= 0 else value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class PipelineConfig(_Open):
    """LocalAI's `pipeline:` — a realtime model made of other models, each named as clients name it: `vad` cuts the
    user's turns (server VAD), `transcription` hears them, `llm` answers, `tts` speaks the answer."""

    vad: str | None = None
    transcription: str | None = None
    llm: str | None = None
    tts: str | None = None

    def parts(self) -> list[str]:
        return [name for name in (self.vad, self.transcription, self.llm, self.tts) if name]


class TemplateConfig(_Open):
    """`template:` — Hearth reads `chat` as a Jinja chat template (HF style, `messages` in scope)."""

    chat: str | None = None


class FunctionGrammarConfig(_Open):
    """`function.grammar:` (LocalAI's block)."""

    # Do not constrain forced tool calls (tool_choice required or named) with a grammar.
    disable: bool = False


class FunctionConfig(_Open):
    """`function:` — how the model calls tools (LocalAI's block, where it maps)."""

    # The output family (hermes, qwen3-coder, gpt-oss, deepseek, … see hearth/chat/families.py); unset: chosen from
    # the chat template.
    tool_format: str | None = None
    function_name_key: str = Field("name", min_length=1)
    function_arguments_key: str = Field("arguments", min_length=1)
    grammar: FunctionGrammarConfig = Field(default_factory=FunctionGrammarConfig)

    @field_validator("tool_format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        from hearth.chat.families import FAMILIES

        if value is not None and value not in FAMILIES:
            raise ValueError(f"'{value}' is not an output format Hearth reads; one of: {', '.join(sorted(FAMILIES))}")
        return value


class ReasoningConfig(_Open):
    """`reasoning:` — how a thinking model's thoughts are handled (llama-server's flags of the same names)."""

    format: Literal["auto", "none"] = "auto"  # none: thoughts stay in the answer's text
    budget: int | None = Field(None, ge=0, le=2**31 - 1)  # thought tokens before thinking is ended; 0: no thoughts
    # The OpenAI chat field(s) thoughts are sent in: llama-server's reasoning_content, vLLM's and Ollama's reasoning.
    field: Literal["both", "reasoning_content", "reasoning"] = "both"
    # chat_template_kwargs a request may set beyond enable_thinking and reasoning_effort (which are always allowed).
    template_kwargs: list[str] = Field(default_factory=list)


# Resources Ray counts itself: a model asks for them through threads and memory_mb, not as custom resources.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ModelConfig(_Open):
    """One model: what clients call it, which backend runs it, and its files and defaults."""

    name: str
    backend: str | None = None
    parameters: Parameters = Field(default_factory=Parameters)
    context_size: int | None = Field(None, ge=16, le=2**31 - 1)
    threads: int | None = Field(None, ge=1, le=1024)
    # Give up a thread while other processes keep this model's threads waiting for a core; unset: the server's
    # --no-adapt-threads / HEARTH_ADAPT_THREADS (on by default).
    adapt_threads: bool | None = None
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
    # On a Ray cluster (`hearth serve --ray`): how many copies of the model run, and what each asks the scheduler for
    # beyond `threads` CPUs: memory (unset: estimated from the files and the context), custom resources, and the
    # labels of the nodes it may run on (`ray start --labels`).
    replicas: int = Field(1, ge=1, le=64)
    min_replicas: int | None = Field(None, ge=1, le=64)  # scaled down to this when idle (default: replicas)
    max_replicas: int | None = Field(None, ge=1, le=64)  # scaled up to this while every replica's slots are taken
    memory_mb: int | None = Field(None, ge=1, le=2**31 - 1)
    resources: dict[str, float] = Field(default_factory=dict)
    node: dict[str, str] = Field(default_factory=dict)
    stopwords: list[str] = Field(default_factory=list)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    function: FunctionConfig = Field(default_factory=FunctionConfig)
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    reasoning_budget: int | None = Field(None, ge=-1, le=2**31 - 1)  # llama-server's name for reasoning.budget
    alias: list[str] = Field(default_factory=list)
    disabled: bool = False
    description: str = ""
    known_usecases: list[str] = Field(default_factory=list)
    # LocalAI's backend options: "key:value" strings, or a bare "key" for on (`parse_options`).
    options: list[str] = Field(default_factory=list)
    # llama-cpp: a reranker GGUF (Qwen3-Reranker, jina-reranker), served on /v1/rerank with llama.cpp's rank pooling.
    reranking: bool = False
    # LocalAI's draft model for speculative decoding (a file in the models directory, or an installed model's name),
    # with options spec_type, spec_n_max, spec_n_min, spec_p_min (hearth/config/speculation.py).
    draft_model: str | None = None
    f16: bool | None = None  # LocalAI's: llama-cpp keeps its KV cache in f16 (its default here too)
    cache_type_k: str | None = None  # llama-cpp: the KV cache's types (f16, q8_0, q4_0, …), as llama-server's flags
    cache_type_v: str | None = None
    # Options of the deterministic test backend (see backends/fake.py).
    fake: dict[str, Any] | None = None
    # A realtime model: no backend of its own, the models it is made of (served on /v1/realtime).
    pipeline: PipelineConfig | None = None

    # Filled by the loader, never read from YAML.
    source_file: str | None = Field(None, exclude=True)
    model_path: str | None = Field(None, exclude=True)
    mmproj_path: str | None = Field(None, exclude=True)
    vision_tower: bool = Field(False, exclude=True)  # a transformers folder whose config.json has a vision_config
    resolved_backend: str | None = Field(None, exclude=True)  # `whisper` resolved by its file (resolve_backend)
    part_paths: dict[str, str] = Field(default_factory=dict, exclude=True)  # more files by role (sd.cpp parts, draft)

    @field_validator("options", mode="before")
    @classmethod
    def _option_strings(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [str(item) if isinstance(item, str | int | float | bool) else item for item in value]
        return value

    @field_validator("cache_type_k", "cache_type_v")
    @classmethod
    def _cache_type(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in KV_CACHE_TYPES:
            raise ValueError(f"'{value}' is not a KV cache type; use one of {', '.join(KV_CACHE_TYPES)}")
        return value.lower() if value else None

    @property
    def option_map(self) -> dict[str, str | bool]:
        return parse_options(self.options)

    @model_validator(mode="after")
    def _budget_alias(self) -> ModelConfig:
        if self.reasoning_budget is not None and self.reasoning.budget is None:
            self.reasoning.budget = None if self.reasoning_budget < 0 else self.reasoning_budget
        return self

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for key, amount in value.items():
            if key in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"resources: '{key}' is not a custom resource; set threads (CPUs) or memory_mb")
            if amount < 0:
                raise ValueError(f"resources: '{key}' must not be negative")
        return value

    @field_validator("node")
    @classmethod
    def _node_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, wanted in value.items():
            if wanted.startswith("!") or wanted.startswith("in("):
                raise ValueError(f"node: '{key}' must name one value: labels are matched as they are written")
        return value

    @model_validator(mode="after")
    def _replica_bounds(self) -> ModelConfig:
        if self.min_replicas is not None and self.min_replicas > self.replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is more than replicas ({self.replicas})")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is less than replicas ({self.replicas})")
        return self

    @model_validator(mode="after")
    def _speculative_settings(self) -> ModelConfig:
        speculation_from(self.option_map, bool(self.draft_model))  # refused now, with the file's name, not at load
        return self

    @property
    def replicated(self) -> bool:
        """Whether the model may run as several replicas (on a Ray cluster), so requests choose among them."""
        return max(self.replicas, self.max_replicas or 0) > 1

    @property
    def speculative(self) -> Speculation | None:
        """Speculative decoding's settings, from `draft_model` and the `spec_*` options (None: none)."""
        return speculation_from(self.option_map, bool(self.draft_model))

    @property
    def usecases(self) -> list[str]:
        """What the model is for: its YAML's known_usecases, else what its backend serves."""
        if self.pipeline is not None:
            return ["realtime"]
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
        """The resolved files this model uses: its weights, the projector of a vision GGUF, and its other parts."""
        return [p for p in (self.model_path, self.mmproj_path, *self.part_paths.values()) if p]

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
        return self.resolved_backend or canonical_backend(self.backend or "") or ""
