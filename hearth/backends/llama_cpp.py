"""llama.cpp through llama-cpp-python's low-level C API: GGUF models, sampling in C, a per-sequence KV cache."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import hashlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as L
import llama_cpp.mtmd_cpp as M

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import (
    GenerationChunk,
    GenerationSpec,
    LoadSpec,
    ModelDescription,
    Sampling,
)
from hearth.backends.llama_pooled import PooledContext
from hearth.backends.llama_scheduler import Job, Media, MediaImage, Scheduler
from hearth.backends.llama_speculative import DraftModel
from hearth.config.schema import parse_options
from hearth.config.speculation import Speculation, not_done, speculation_from
from hearth.errors import (
    CapabilityNotSupported,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadFailed,
)

DEFAULT_CONTEXT = 4096  # per sequence, when the YAML sets no context_size
DEFAULT_PARALLEL = 4
# Streamed text goes to the API process at most this often per stream (YAML `stream_interval_ms`; 0: every token;
# N times that with N streams generating, up to 4x: see llama_scheduler.STREAM_SPREAD). Fewer
# deliveries leave the cores to the decode loop: on two cores, a delivery per token costs fast models 4-8% speed.
DEFAULT_STREAM_INTERVAL_MS = 25
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
# llama.cpp's own sampling defaults (common/common.h), used where neither request nor YAML says.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repeat_last_n": 64}
RANDOM_SEED = 0xFFFFFFFF
# LocalAI's cache_type_k / cache_type_v (llama-server's --cache-type-k names): ggml's type, and bytes per element.
KV_TYPES = {"f32": (0, 4.0), "f16": (1, 2.0), "q4_0": (2, 18 / 32), "q4_1": (3, 20 / 32), "q5_0": (6, 22 / 32),
            "q5_1": (7, 24 / 32), "q8_0": (8, 34 / 32), "iq4_nl": (20, 18 / 32), "bf16": (30, 2.0)}

log = logging.getLogger("hearth.runner.llama")


class _LlamaLog:
    """Collects llama.cpp's warnings and errors so a failed load can say why."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=50)

        @L.llama_log_callback
        def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            if level >= GGML_LOG_LEVEL_WARN and level != 5:  # 5 continues the previous line
                message = text.decode("utf-8", errors="replace").strip()
                if message:
                    self.lines.append(message)

        self.callback = callback  # keep a reference: C holds only the pointer
        L.llama_log_set(callback, ctypes.c_void_p(0))

    def reason(self) -> str:
        interesting = [line for line in self.lines if "error" in line.lower() or "failed" in line.lower()]
        return "; ".join(interesting[-3:] or list(self.lines)[-3:])


_LOG: _LlamaLog | None = None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def maps_weights(setting: bool | None, size: int, available: int | None) -> bool:
    """Whether to map the weights from the file (LocalAI's `mmap`) instead of reading them into the runner's memory.
    Read in, they sit in transparent huge pages (the runner's environment asks glibc for them, see
    hearth/runtime/process.py) and decode 4 to 11% faster on CPU than mapped (benchmarks/README.md), so that is the
    default for weights that take at most half the memory available; larger ones are mapped, and the kernel pages
    them as it must."""
    if setting is not None:
        return setting
    return available is None or size > available // 2


def _check_gguf(path: Path, what: str) -> None:
    """ModelLoadFailed unless `path` is a GGUF file, saying what is wrong with it."""
    if not path.exists():
        raise ModelLoadFailed(f"{what} {path.name} does not exist in the models directory")
    if not path.is_file():
        raise ModelLoadFailed(f"{what} {path.name} is not a file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":  # (the message never quotes the file's bytes: they may be anything, a secret too)
        raise ModelLoadFailed(f"{path.name} is not a GGUF file (it does not start with GGUF's magic bytes)")


def sequences_that_fit(wanted: int, kv_per_sequence: int, available: int | None) -> int:
    """How many sequences' KV caches the memory holds, up to `wanted` (0: not even one)."""
    if available is None or kv_per_sequence <= 0:
        return wanted
    return max(0, min(wanted, available // kv_per_sequence))


def _stream_interval(config: dict) -> float:
    given = config.get("stream_interval_ms")
    return (DEFAULT_STREAM_INTERVAL_MS if given is None else float(given)) / 1000


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Backend(BaseBackend):
    name = "llama-cpp"

    def __init__(self) -> None:
        self.model = None
        self.ctx = None
        self.vocab = None
        self.n_ctx = 0
        self.n_batch = 512
        self.n_vocab = 0
        self.n_ctx_seq = 0
        self.scheduler: Scheduler | None = None
        self.pooled: PooledContext | None = None  # embeddings and rerankers (embeddings: true, reranking: true)
        self.kv_types = (KV_TYPES["f16"], KV_TYPES["f16"])
        self.mtmd: Any = None  # llama.cpp's multimodal context (the mmproj projector), for vision models
        self.drafter: DraftModel | None = None  # speculative decoding's draft model (draft_model:)
        self.speculation: Speculation | None = None  # how requests guess unless they say otherwise

    # -- loading ---------------------------------------------------------------------------------------

    def load(self, spec: LoadSpec) -> ModelDescription:
        global _LOG
        path = Path(spec.model_path)
        _check_gguf(path, "model file")
        size = path.stat().st_size
        available = _mem_available()
        if available is not None and size > available:
            raise ModelLoadFailed(f"not enough memory: {path.name} needs {_gib(size)} but only {_gib(available)} "
                                  f"is available")

        if _LOG is None:
            _LOG = _LlamaLog()
            L.llama_backend_init()
        _LOG.lines.clear()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = L.LLAMA_LOAD_MODE_MMAP if maps_weights(spec.config.get("mmap"), size, available) \
            else L.LLAMA_LOAD_MODE_NONE
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelLoadFailed(f"llama.cpp could not load {path.name}: {_LOG.reason() or 'unknown reason'}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        train_ctx = L.llama_model_n_ctx_train(self.model)
        mmproj = spec.files.get("mmproj")
        if spec.config.get("embeddings") or spec.config.get("reranking"):
            if mmproj:
                raise ModelLoadFailed("'mmproj' cannot be combined with 'embeddings: true' or 'reranking: true'")
            return self._load_pooled(spec, train_ctx)
        # context_size is what one request may use (prompt and reply), as LocalAI's users mean it: the KV cache
        # holds it for each of the `parallel` sequences, or for as many as the memory allows.
        self.kv_types = (KV_TYPES[str(spec.config.get("cache_type_k") or "f16")],
                         KV_TYPES[str(spec.config.get("cache_type_v") or "f16")])
        per_sequence = spec.context_size or min(train_ctx or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        wanted = spec.parallel or DEFAULT_PARALLEL
        available = _mem_available()
        parallel = sequences_that_fit(wanted, self._kv_bytes(per_sequence), available)
        if parallel == 0:
            raise ModelLoadFailed(
                f"not enough memory: a {per_sequence}-token context for this model needs "
                f"{_gib(self._kv_bytes(per_sequence))} but only {_gib(available or 0)} is available; lower "
                f"context_size in the model's YAML")
        if parallel < wanted:
            log.warning("%s: %d sequences of %d tokens need %s of KV cache, more than the %s available; serving %d "
                        "at once instead (lower context_size to serve more)", spec.model_name, wanted, per_sequence,
                        _gib(self._kv_bytes(per_sequence) * wanted), _gib(available or 0), parallel)
        self.n_ctx = per_sequence * parallel

        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = parallel
        cparams.kv_unified = False  # one KV stream per sequence: no sequence can crowd out another
        cparams.n_threads = spec.threads
        cparams.n_threads_batch = spec.threads
        cparams.no_perf = True
        flash = spec.config.get("flash_attention")  # LocalAI's field; llama.cpp decides when it is not set
        if flash is not None:
            cparams.flash_attn_type = 1 if flash else 0
        cparams.type_k, cparams.type_v = self.kv_types[0][0], self.kv_types[1][0]
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ModelLoadFailed(f"llama.cpp could not create a context of {self.n_ctx} tokens for {path.name}: "
                                  f"{_LOG.reason() or 'unknown reason'}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_ctx_seq = L.llama_n_ctx_seq(self.ctx)
        try:
            options = parse_options(spec.config.get("options") or [])
            speculation = speculation_from(options, bool(spec.config.get("draft_model")))
            if not_done(options):
                log.warning("%s: %s", path.name, not_done(options))
        except ValueError as exc:  # (the server refuses such a YAML; a runner started by hand may get one)
            raise ModelLoadFailed(str(exc)) from None
        if speculation is not None and speculation.drafts:
            draft = spec.files.get("draft_model")
            if not draft:
                raise ModelLoadFailed(f"draft_model '{spec.config.get('draft_model')}' is neither a GGUF file in the "
                                      f"models directory nor an installed llama-cpp model")
            _check_gguf(Path(draft), "draft_model")
            draft_size = Path(draft).stat().st_size
            mode = L.LLAMA_LOAD_MODE_MMAP if maps_weights(spec.config.get("mmap"), size + draft_size, _mem_available()) \
                else L.LLAMA_LOAD_MODE_NONE
            self.drafter = DraftModel(draft, self.model, parallel, self.n_ctx_seq, spec.threads, mode)
        if speculation is not None:
            log.info("%s: speculative decoding with %s (up to %d tokens guessed while at most %d sequences "
                     "generate)", spec.model_name, speculation.kind, speculation.n_max, speculation.max_batch)
        self.scheduler = Scheduler(self.ctx, self.vocab, n_parallel=parallel, n_ctx_seq=self.n_ctx_seq,
                                   n_batch=self.n_batch, queue_size=int(spec.config.get("queue_size") or 64),
                                   piece=self._piece, n_vocab=self.n_vocab, mtmd=None,
                                   stream_interval=_stream_interval(spec.config), share=spec.share(),
                                   drafter=self.drafter)
        self.speculation = speculation
        if mmproj:
            self.mtmd = self._load_projector(Path(mmproj), spec.threads)
            self.scheduler.mtmd = self.mtmd

        template = L.llama_model_chat_template(self.model, None)
        capabilities = ["generate", "tokenize"]
        if template:
            capabilities.append("chat")
        if self._fim_tokens():
            capabilities.append("fim")
        metadata = {key: value for key in ("general.name", "general.file_type", "general.quantization_version")
                    if (value := self._meta(key))}
        if self.mtmd:
            capabilities.append("vision")
            # The API process writes this marker where each image goes in the rendered prompt.
            metadata["media_marker"] = M.mtmd_default_marker().decode()
        return ModelDescription(
            backend=self.name,
            capabilities=capabilities,
            context_size=self.n_ctx_seq,
            train_context_size=train_ctx,
            chat_template=template.decode("utf-8", errors="replace") if template else "",
            bos_token=self._token_text(L.llama_vocab_bos(self.vocab)),
            eos_token=self._token_text(L.llama_vocab_eos(self.vocab)),
            add_bos=bool(L.llama_vocab_get_add_bos(self.vocab)),
            architecture=self._meta("general.architecture"),
            parameter_count=int(L.llama_model_n_params(self.model)),
            size_bytes=int(L.llama_model_size(self.model)),
            embedding_size=int(L.llama_model_n_embd(self.model)),
            parallel=parallel,
            metadata=metadata,
        )

    def _load_projector(self, path: Path, threads: int) -> Any:
        """llama.cpp's multimodal context for a projector (mmproj) GGUF that belongs to the loaded text model."""
        assert _LOG is not None
        _check_gguf(path, "projector file (mmproj)")
        _LOG.lines.clear()
        M.mtmd_helper_log_set(_LOG.callback, ctypes.c_void_p(0))
        params = M.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False
        context = M.mtmd_init_from_file(str(path).encode(), self.model, params)
        if not context:
            raise ModelLoadFailed(f"llama.cpp could not load the projector {path.name} for this model: "
                                  f"{_LOG.reason() or 'unknown reason'}")
        if not M.mtmd_support_vision(context):
            M.mtmd_free(context)
            raise ModelLoadFailed(f"the projector {path.name} has no vision encoder (audio projectors are not "
                                  f"supported)")
        return context

    def _load_pooled(self, spec: LoadSpec, train_ctx: int) -> ModelDescription:
        """An embeddings model, or a reranker (reranking: true wins: its output is scores, not vectors)."""
        assert _LOG is not None
        rank = bool(spec.config.get("reranking"))
        architecture = self._meta("general.architecture")
        self.pooled = PooledContext(self.model, self.vocab, spec, train_ctx, rank=rank, tokenize=self.tokenize,
                                    check_tokens=self._check_tokens, reason=_LOG.reason, architecture=architecture)
        self.n_ctx = self.n_ctx_seq = self.pooled.n_ctx
        if rank:
            capabilities = ["rerank", "tokenize"]
        else:
            capabilities = ["embed", "tokenize"] + (["rerank"] if spec.config.get("similarity_rerank", True) else [])
        return ModelDescription(
            backend=self.name, capabilities=capabilities, context_size=self.n_ctx, train_context_size=train_ctx,
            bos_token=self._token_text(L.llama_vocab_bos(self.vocab)),
            eos_token=self._token_text(L.llama_vocab_eos(self.vocab)),
            add_bos=bool(L.llama_vocab_get_add_bos(self.vocab)), architecture=architecture,
            parameter_count=int(L.llama_model_n_params(self.model)), size_bytes=int(L.llama_model_size(self.model)),
            embedding_size=self.pooled.embedding_size, parallel=1,
            metadata={"pooling": self.pooled.pooling, **({"classes": str(self.pooled.n_out)} if rank else {})})

    def embed(self, inputs: list[str | list[int]], truncate: bool, normalize: bool) -> tuple[Any, list[int]]:
        if self.pooled is None or self.pooled.rank:
            raise CapabilityNotSupported("this model is not loaded for embeddings (embeddings: true)")
        return self.pooled.embed(inputs, truncate, normalize)

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        if self.pooled is not None and self.pooled.rank:
            return self.pooled.rerank(query, documents)[0]
        return super().rerank(query, documents)  # an embeddings model: cosine similarity

    def _kv_bytes(self, n_ctx: int) -> int:
        n_layer = L.llama_model_n_layer(self.model)
        n_head = max(L.llama_model_n_head(self.model), 1)
        n_head_kv = L.llama_model_n_head_kv(self.model)
        head_dim = L.llama_model_n_embd(self.model) // n_head
        per_element = self.kv_types[0][1] + self.kv_types[1][1]  # K and V
        return int(n_layer * n_ctx * n_head_kv * head_dim * per_element)

    def _meta(self, key: str) -> str:
        buffer = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace") if n >= 0 else ""

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = L.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def _fim_tokens(self) -> tuple[int, int, int] | None:
        tokens = (L.llama_vocab_fim_pre(self.vocab), L.llama_vocab_fim_suf(self.vocab),
                  L.llama_vocab_fim_mid(self.vocab))
        return tokens if all(t >= 0 for t in tokens) else None

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        if self.pooled is not None:
            self.pooled.close()
            self.pooled = None
        if self.mtmd:
            M.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    # -- tokens ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        while True:
            buffer = (L.llama_token * capacity)()
            n = L.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, parse_special)
            if n >= 0:
                return list(buffer[:n])
            capacity = -n

    def detokenize(self, tokens: list[int]) -> str:
        self._check_tokens(tokens, "tokens")
        array = (L.llama_token * max(len(tokens), 1))(*tokens)
        capacity = len(tokens) * 16 + 16
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            n = L.llama_detokenize(self.vocab, array, len(tokens), buffer, capacity, False, True)
            if n >= 0:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            capacity = -n

    def _check_tokens(self, tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise InvalidRequest(f"token {token} is not in the model's vocabulary (0..{self.n_vocab - 1})",
                                     param=param)

    def _piece(self, token: int, buffer: ctypes.Array) -> bytes:
        n = L.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    # -- generation ------------------------------------------------------------------------------------

    def active_requests(self) -> int:
        return self.scheduler.in_flight() if self.scheduler else 0

    def _prompt_tokens(self, spec: GenerationSpec) -> list[int]:
        if spec.prompt_tokens is not None:
            self._check_tokens(spec.prompt_tokens, "prompt")
            tokens = list(spec.prompt_tokens)
        else:
            tokens = self.tokenize(spec.prompt or "", spec.add_special, spec.parse_special)
        if spec.suffix is not None:
            fim = self._fim_tokens()
            if fim is None:
                raise InvalidRequest("this model has no fill-in-the-middle tokens, so 'suffix' is not supported",
                                     param="suffix")
            bos = [L.llama_vocab_bos(self.vocab)] if L.llama_vocab_get_add_bos(self.vocab) else []
            prefix = self.tokenize(spec.prompt or "", False, False) if spec.prompt_tokens is None else tokens
            tokens = [*bos, fim[0], *prefix, fim[1], *self.tokenize(spec.suffix, False, False), fim[2]]
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        return tokens

    def _grammar(self, grammar: str, triggers: list[str]) -> ctypes.c_void_p:
        """A grammar sampler (lazy when triggers are given); a grammar llama.cpp cannot parse is the caller's error,
        with llama.cpp's reason."""
        assert _LOG is not None
        _LOG.lines.clear()
        if triggers:
            patterns = (ctypes.c_char_p * len(triggers))(*[t.encode("utf-8") for t in triggers])
            sampler = L.llama_sampler_init_grammar_lazy_patterns(self.vocab, grammar.encode("utf-8"), b"root",
                                                                  patterns, len(triggers), None, 0)
        else:
            sampler = L.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            reason = _LOG.reason()
            raise InvalidRequest(f"the grammar is not valid GBNF{': ' + reason if reason else ''}", param="grammar")
        return sampler

    def _sampler(self, sampling: Sampling, look_back: list[int]) -> ctypes.c_void_p:
        """llama.cpp's sampler chain for one sequence: bias, penalties, then greedy or the random chain. (A grammar
        is a sampler of its own: the scheduler consults it only when the chain's choice breaks it.)"""
        def value(name: str):
            given = getattr(sampling, name)
            return DEFAULTS[name] if given is None else given

        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if sampling.logit_bias:
            biases = (L.llama_logit_bias * len(sampling.logit_bias))(
                *[L.llama_logit_bias(token, bias) for token, bias in sampling.logit_bias.items()])
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(sampling.logit_bias),
                                                                             biases))
        repeat, freq, presence = value("repeat_penalty"), value("frequency_penalty"), value("presence_penalty")
        if repeat != 1.0 or freq != 0.0 or presence != 0.0:
            penalties = L.llama_sampler_init_penalties(value("repeat_last_n"), repeat, freq, presence)
            for token in look_back:  # penalties look back into the prompt, as llama-server's do
                L.llama_sampler_accept(penalties, token)
            L.llama_sampler_chain_add(chain, penalties)
        temperature = value("temperature")
        if temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        top_k = value("top_k")
        if top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
        if sampling.typical_p is not None and sampling.typical_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_typical(sampling.typical_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(value("top_p"), 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(value("min_p"), 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
        seed = RANDOM_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def _generating(self) -> Scheduler:
        if self.scheduler is None:
            raise CapabilityNotSupported("this model is loaded for embeddings or reranking (embeddings: true or "
                                         "reranking: true), not to generate")
        return self.scheduler

    def generate(self, spec: GenerationSpec, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        job = self._generating().submit(self._job(spec))
        yield from job.chunks(cancelled)

    async def agenerate(self, spec: GenerationSpec) -> AsyncIterator[GenerationChunk]:
        """As `generate`, fed by the decode loop straight into this event loop, once per step."""
        self._generating()
        job = await asyncio.to_thread(self._job, spec)  # tokenizing a long prompt should not hold up the loop
        job.loop, job.aqueue = asyncio.get_running_loop(), asyncio.Queue()
        self._generating().submit(job)
        async for chunk in job.achunks():
            yield chunk

    def _job(self, spec: GenerationSpec) -> Job:
        """Checks the request against the context and makes the scheduler's job for it."""
        media = self._media(spec) if spec.images else None
        tokens = media.tokens if media else self._prompt_tokens(spec)
        if len(tokens) >= self.n_ctx_seq:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens, but the model's context is {self.n_ctx_seq} tokens; "
                f"shorten the prompt or raise context_size", param="messages")
        if spec.max_tokens and len(tokens) + spec.max_tokens > self.n_ctx_seq:
            raise ContextLengthExceeded(
                f"the model's context is {self.n_ctx_seq} tokens, but {len(tokens) + spec.max_tokens} were requested "
                f"({len(tokens)} in the prompt, {spec.max_tokens} for the completion); lower max_tokens",
                param="max_tokens")
        look_back = [t for t in tokens if t >= 0][-(spec.sampling.repeat_last_n or DEFAULTS["repeat_last_n"]):]
        if spec.sampling.grammar:
            # Refuse a bad grammar now, not mid-loop.
            L.llama_sampler_free(self._grammar(spec.sampling.grammar, spec.sampling.grammar_triggers))

        def make_sampler() -> tuple[Any, Any]:  # llama_sampler pointers: the chain, and the grammar or None
            chain = self._sampler(spec.sampling, look_back)
            if not spec.sampling.grammar:
                return chain, None
            try:
                return chain, self._grammar(spec.sampling.grammar, spec.sampling.grammar_triggers)
            except BaseException:
                L.llama_sampler_free(chain)
                raise

        return Job(tokens=tokens, max_tokens=spec.max_tokens, stops=spec.stop, ignore_eos=spec.ignore_eos,
                   make_sampler=make_sampler, request_id=spec.request_id, logprobs=spec.logprobs,
                   top_logprobs=spec.top_logprobs, media=media, speculation=self._speculation_for(spec.sampling))

    def _speculation_for(self, sampling: Sampling) -> Speculation | None:
        """The model's speculation, or the request's own (llama-server's speculative.type and speculative.n_max)."""
        kind, n_max = sampling.speculative_type, sampling.speculative_n_max
        if kind == "none" or n_max == 0:
            return None
        found = self.speculation
        if kind and (found is None or found.kind != kind):  # (a request names one kind; the model may use both)
            if kind == "draft-simple" and self.drafter is None:
                raise InvalidRequest("speculative.type draft-simple needs a model with a draft_model",
                                     param="speculative.type")
            found = speculation_from({"spec_type": kind}, self.drafter is not None)
        if found is not None and n_max is not None:
            found = dataclasses.replace(found, n_max=n_max, n_min=min(found.n_min, n_max),
                                        draft_n_max=min(found.draft_n_max, n_max))
        return found

    def _media(self, spec: GenerationSpec) -> Media:
        """The prompt with its images, cut by llama.cpp into text and image chunks (images preprocessed)."""
        if not self.mtmd:
            raise CapabilityNotSupported("this model does not accept images (its YAML names no mmproj projector)",
                                         param="messages")
        if spec.prompt_tokens is not None or spec.suffix is not None:
            raise InvalidRequest("images can only be sent with a text prompt", param="prompt")
        marker = M.mtmd_default_marker().decode()
        prompt = spec.prompt or ""
        if prompt.count(marker) != len(spec.images):
            raise InvalidRequest(f"the prompt has {prompt.count(marker)} image places ({marker}) but "
                                 f"{len(spec.images)} images were sent", param="messages")
        bitmaps = []
        media = Media()
        try:
            for number, data in enumerate(spec.images):
                buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bitmap = M.mtmd_helper_bitmap_init_from_buf(self.mtmd, buffer, len(data), False)
                if not bitmap:
                    raise InvalidRequest(f"image {number + 1} could not be decoded by llama.cpp", param="messages")
                bitmaps.append(bitmap)
                # Its chunks carry this id: what the prompt cache knows the image by.
                M.mtmd_bitmap_set_id(bitmap, hashlib.blake2b(data, digest_size=16).hexdigest().encode())
            media.chunks = M.mtmd_input_chunks_init()
            data = prompt.encode("utf-8")
            text = M.mtmd_input_text(text=data, text_len=len(data), add_special=spec.add_special,
                                     parse_special=spec.parse_special)
            array = (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            result = M.mtmd_tokenize(self.mtmd, media.chunks, ctypes.byref(text), array, len(bitmaps))
            if result != 0:
                raise InvalidRequest(f"llama.cpp could not prepare the images for this model (code {result})",
                                     param="messages")
            for index in range(M.mtmd_input_chunks_size(media.chunks)):
                chunk = M.mtmd_input_chunks_get(media.chunks, index)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t(0)
                    pointer = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    media.tokens.extend(pointer[i] for i in range(count.value))
                    continue
                image = MediaImage(start=len(media.tokens), chunk=chunk, n_tokens=M.mtmd_input_chunk_get_n_tokens(chunk),
                                   n_pos=M.mtmd_input_chunk_get_n_pos(chunk))
                media.images.append(image)
                media.tokens.extend([_image_token(M.mtmd_input_chunk_get_id(chunk), index)] * image.n_tokens)
            if media.images and media.images[-1].end == len(media.tokens):
                # The first token is sampled from the logits of the prompt's last text token.
                raise InvalidRequest("the prompt ends with an image; put some text after it", param="messages")
        except BaseException:
            media.close()
            raise
        finally:
            for bitmap in bitmaps:
                M.mtmd_bitmap_free(bitmap)
        return media


def _image_token(image_id: bytes | None, index: int) -> int:
    """The negative id an image chunk's positions stand as in a token list: the same for the same image bytes in
    the same place of the prompt, and never a vocabulary token."""
    digest = hashlib.blake2b(b"%s/%d" % (image_id or os.urandom(16), index), digest_size=7).digest()
    return -1 - int.from_bytes(digest, "little")
