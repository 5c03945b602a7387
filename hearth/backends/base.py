"""What a backend is: the capabilities a runner can ask of it, and the plain types they use."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hearth.cores import Board, Share
from hearth.errors import CapabilityNotSupported, ModelLoadFailed

# Canonical backend name -> module that defines `Backend` (imported only inside the runner).
BACKEND_MODULES = {
    "llama-cpp": "hearth.backends.llama_cpp",
    "sentencetransformers": "hearth.backends.sentence_transformers",
    "faster-whisper": "hearth.backends.whisper",
    "whisper-cpp": "hearth.backends.whisper_cpp",
    "transformers": "hearth.backends.transformers_vlm",
    "diffusers": "hearth.backends.diffusers_backend",
    "stablediffusion-ggml": "hearth.backends.stable_diffusion_ggml",
    "piper": "hearth.backends.piper",
    "silero-vad": "hearth.backends.silero_vad",
    "fake": "hearth.backends.fake",
}


@dataclass
class LoadSpec:
    model_name: str
    backend: str
    model_path: str
    config: dict[str, Any]
    threads: int
    context_size: int = 0
    parallel: int = 0
    files: dict[str, str] = field(default_factory=dict)
    board: Board | None = None  # which runners are working now, when the server that started this one keeps it

    def share(self) -> Share:
        """The threads to compute with at each step: `threads` alone, fewer while other runners work too."""
        return Share(self.threads, self.board, adapt=self.config.get("adapt_threads"))

    @classmethod
    def from_json(cls, model_name: str, backend: str, model_path: str, config_json: str, **rest: Any) -> LoadSpec:
        return cls(model_name=model_name, backend=backend, model_path=model_path,
                   config=json.loads(config_json or "{}"), **rest)


@dataclass
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str = ""
    grammar_triggers: list[str] = field(default_factory=list)
    typical_p: float | None = None
    speculative_type: str = ""  # speculative decoding for this request (empty: the model's; "none": off)
    speculative_n_max: int | None = None


@dataclass
class GenerationSpec:
    prompt: str | None
    prompt_tokens: list[int] | None
    parse_special: bool = False
    add_special: bool = True
    suffix: str | None = None
    max_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    ignore_eos: bool = False
    request_id: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    images: list[bytes] = field(default_factory=list)  # encoded images, in prompt order (vision models)


@dataclass
class TokenLogprob:
    """A generated token and its log probability; `top` holds the most likely alternatives, best first."""

    token: int
    text: str
    logprob: float
    bytes: bytes
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenerationChunk:
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    stop_sequence: str = ""  # on the last chunk: the stop string that ended it, if one did
    draft_n: int = 0  # on the last chunk: tokens guessed by speculative decoding, and those the model kept
    draft_accepted: int = 0


@dataclass
class TranscriptionSpec:
    audio: bytes
    language: str = ""
    prompt: str = ""
    temperature: float | None = None
    translate: bool = False
    word_timestamps: bool = False


@dataclass
class TranscribedWord:
    start: float
    end: float
    word: str
    probability: float = 0.0


@dataclass
class TranscribedSegment:
    id: int
    start: float
    end: float
    text: str
    words: list[TranscribedWord] = field(default_factory=list)
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: list[int] = field(default_factory=list)


@dataclass
class TranscriptionDone:
    """The last item of a transcription: what was detected."""

    language: str
    duration: float


@dataclass
class SpeechSpec:
    text: str
    voice: str = ""
    speed: float = 1.0
    response_format: str = "mp3"


@dataclass
class ModelDescription:
    backend: str
    capabilities: list[str]
    context_size: int = 0
    train_context_size: int = 0
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    architecture: str = ""
    parameter_count: int = 0
    size_bytes: int = 0
    embedding_size: int = 0
    parallel: int = 1
    voices: list[str] = field(default_factory=list)
    image_sizes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


class Backend:
    """Base class: a backend overrides the capabilities it has; the rest refuse clearly."""

    name = "base"

    def load(self, spec: LoadSpec) -> ModelDescription:
        raise NotImplementedError

    def generate(self, spec: GenerationSpec, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        raise CapabilityNotSupported(f"backend '{self.name}' does not generate text")

    async def agenerate(self, spec: GenerationSpec) -> AsyncIterator[GenerationChunk]:
        """`generate` for the runner's event loop: by default the blocking generator runs in a thread of its own.

        Leaving the loop early (the caller went away) makes `cancelled()` true for the generator.
        """
        async for chunk in iterate_in_thread(lambda cancelled: self.generate(spec, cancelled)):
            yield chunk

    def embed(self, inputs: list[str | list[int]], truncate: bool, normalize: bool) -> tuple[Any, list[int]]:
        """One vector per input (a float32 array, inputs x dimensions) and each input's token count."""
        raise CapabilityNotSupported(f"backend '{self.name}' does not compute embeddings")

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """A relevance score per document, in input order. By default: the cosine similarity of embeddings."""
        vectors, _ = self.embed([query, *documents], truncate=False, normalize=True)
        return [float(vector @ vectors[0]) for vector in vectors[1:]]

    def transcribe(self, spec: TranscriptionSpec) -> Iterator[TranscribedSegment | TranscriptionDone]:
        """Segments as they are recognised, then one TranscriptionDone."""
        raise CapabilityNotSupported(f"backend '{self.name}' does not transcribe audio")

    def speak(self, spec: SpeechSpec) -> Iterator[bytes]:
        """The speech in spec.response_format, piece by piece (sentence by sentence where the format allows)."""
        raise CapabilityNotSupported(f"backend '{self.name}' does not synthesise speech")

    def detect_speech(self, audio: Any, options: dict[str, Any]) -> list[tuple[float, float]]:
        """Speech segments (start, end in seconds) in mono float32 audio at 16 kHz."""
        raise CapabilityNotSupported(f"backend '{self.name}' does not detect speech")

    def generate_image(self, spec: Any) -> Iterator[Any]:
        """Progress items, then one PNG per image (see backends/diffusers_backend.py for the types)."""
        raise CapabilityNotSupported(f"backend '{self.name}' does not generate images")

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raise CapabilityNotSupported(f"backend '{self.name}' has no tokenizer")

    def detokenize(self, tokens: list[int]) -> str:
        raise CapabilityNotSupported(f"backend '{self.name}' has no tokenizer")

    def active_requests(self) -> int:
        return 0

    def close(self) -> None:
        """Free the model; called once before the runner exits."""


async def iterate_in_thread(make: Callable[[Callable[[], bool]], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a thread of its own and hand its items to the event loop as they come.

    `make` gets a `cancelled()` callable; leaving early makes it true and stops the iterator at its next item.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def send(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(items.put_nowait, item)

    def pump() -> None:
        try:
            for item in make(stop.is_set):
                if stop.is_set():
                    return
                send(item)
            send(end)
        except BaseException as exc:  # handed to the loop, which raises it for the caller
            send(exc)

    threading.Thread(target=pump, name="backend-stream", daemon=True).start()
    try:
        while (item := await items.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def need(extra: str, *modules: str, why: str = "") -> list[Any]:
    """The libraries a backend's load needs, imported; a missing one fails the load, naming it and the extra that
    installs it (`why` says what needs them, when that is not plain)."""
    try:
        return [importlib.import_module(module) for module in modules]
    except ImportError as exc:
        raise ModelLoadFailed(f"{why or 'this backend'} needs {' and '.join(modules)}, and {exc.name or exc} is not "
                              f"installed; install it with: pip install 'hearth[{extra}]'") from None


def create_backend(name: str) -> Backend:
    module_name = BACKEND_MODULES.get(name)
    if module_name is None:
        raise ModelLoadFailed(f"this runner has no backend '{name}'; it has: {', '.join(sorted(BACKEND_MODULES))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"llama-cpp": "llama", "sentencetransformers": "embeddings", "faster-whisper": "speech",
                 "whisper-cpp": "speech", "silero-vad": "embeddings",
                 "piper": "speech", "transformers": "torch", "diffusers": "images",
                 "stablediffusion-ggml": "sdcpp"}.get(name, "all")
        raise ModelLoadFailed(
            f"backend '{name}' is not installed ({exc.name or exc}); install it with: pip install 'hearth[{extra}]'"
        ) from None
    return module.Backend()


class StopBuffer:
    """Holds back text that may be the start of a stop string, so stop strings never reach the client."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.matched = ""  # the stop string that ended the output, once one has
        self._pattern = re.compile("|".join(re.escape(s) for s in self.stops)) if self.stops else None

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to send, whether a stop string was hit)."""
        if self._pattern is None:
            return text, False
        self._pending += text
        match = self._pattern.search(self._pending)
        if match:
            self.matched = match.group(0)
            out = self._pending[: match.start()]
            self._pending = ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:n]):
                    keep = n
                    break
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
