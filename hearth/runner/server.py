"""The runner process: one backend, one model, served over gRPC (usually on a Unix socket)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from hearth import errors
from hearth.backends.base import (
    Backend,
    GenerationSpec,
    LoadSpec,
    ModelDescription,
    Sampling,
    SpeechSpec,
    TokenLogprob,
    TranscriptionDone,
    TranscriptionSpec,
    create_backend,
    iterate_in_thread,
)
from hearth.cores import Board
from hearth.runner import hearth_pb2 as pb
from hearth.runner import hearth_pb2_grpc as pb_grpc
from hearth.runner.wire import to_status

log = logging.getLogger("hearth.runner")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
T = TypeVar("T")
# A runner on a network address checks every call for the shared secret (HEARTH_RUNNER_SECRET) in this header.
SECRET_HEADER = "x-hearth-runner-secret"


class SecretCheck(grpc.aio.ServerInterceptor):
    """Every call must carry the secret; without it the call ends UNAUTHENTICATED before any handler runs."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing runner secret")

        self.refusals = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse),
        }

    async def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        given = dict(details.invocation_metadata or ()).get(SECRET_HEADER, "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.secret):
            return await continuation(details)
        handler = await continuation(details)
        return self.refusals[(False, bool(handler and handler.response_streaming))]


def needs_secret(address: str) -> bool:
    """A TCP address other than loopback: reachable from other machines."""
    if address.startswith("unix:"):
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host not in ("127.0.0.1", "localhost", "::1")


async def _abort(context: grpc.aio.ServicerContext, error: errors.HearthError) -> None:
    code, trailers = to_status(error)
    context.set_trailing_metadata(trailers)
    await context.abort(code, error.message)


def _as_hearth_error(exc: Exception) -> errors.HearthError:
    if isinstance(exc, errors.HearthError):
        return exc
    log.error("backend failed", exc_info=exc)
    return errors.BackendError(f"the backend failed: {type(exc).__name__}: {exc}")


async def _guard(context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
    """Run a blocking backend call in a thread; Hearth errors become statuses, anything else INTERNAL."""
    try:
        return await asyncio.to_thread(call)
    except Exception as exc:
        await _abort(context, _as_hearth_error(exc))
    raise AssertionError("unreachable")


def _describe(info: ModelDescription, load_seconds: float) -> pb.ModelInfo:
    return pb.ModelInfo(
        backend=info.backend,
        capabilities=info.capabilities,
        context_size=info.context_size,
        train_context_size=info.train_context_size,
        chat_template=info.chat_template,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        add_bos=info.add_bos,
        architecture=info.architecture,
        parameter_count=info.parameter_count,
        size_bytes=info.size_bytes,
        embedding_size=info.embedding_size,
        parallel=info.parallel,
        voices=info.voices,
        image_sizes=info.image_sizes,
        load_seconds=load_seconds,
        metadata=info.metadata,
    )


def _logprob_message(item: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=item.token, text=item.text, logprob=item.logprob, bytes=item.bytes,
                           top=[_logprob_message(alt) for alt in item.top])


def _generation_spec(request: pb.GenerateRequest) -> GenerationSpec:
    s = request.sampling

    def opt(name: str) -> Any:
        return getattr(s, name) if s.HasField(name) else None

    sampling = Sampling(
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        repeat_penalty=opt("repeat_penalty"),
        presence_penalty=opt("presence_penalty"),
        frequency_penalty=opt("frequency_penalty"),
        repeat_last_n=opt("repeat_last_n"),
        seed=opt("seed"),
        logit_bias=dict(s.logit_bias),
        grammar=s.grammar,
        grammar_triggers=list(s.grammar_triggers),
        typical_p=opt("typical_p"),
        speculative_type=s.speculative_type,
        speculative_n_max=opt("speculative_n_max"),
    )
    return GenerationSpec(
        prompt=request.prompt if not request.prompt_tokens else None,
        prompt_tokens=list(request.prompt_tokens) if request.prompt_tokens else None,
        parse_special=request.parse_special,
        add_special=request.add_special,
        suffix=request.suffix if request.HasField("suffix") else None,
        max_tokens=request.max_tokens,
        stop=list(request.stop),
        sampling=sampling,
        ignore_eos=request.ignore_eos,
        request_id=request.request_id,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        images=list(request.images),
    )


class RunnerService(pb_grpc.RunnerServicer):
    """Serves one backend; Load must come first."""

    def __init__(self, board: Board | None = None) -> None:
        self.board = board
        self.backend: Backend | None = None
        self.spec: LoadSpec | None = None
        self.info: pb.ModelInfo | None = None
        self._load_lock = threading.Lock()

    def _loaded(self) -> Backend:
        if self.backend is None:
            raise errors.ModelLoadFailed("no model is loaded in this runner; call Load first")
        return self.backend

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(
            loaded=self.backend is not None,
            backend=self.spec.backend if self.spec else "",
            model_name=self.spec.model_name if self.spec else "",
            pid=os.getpid(),
            active_requests=self.backend.active_requests() if self.backend else 0,
        )

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        def load() -> pb.ModelInfo:
            with self._load_lock:
                if self.backend is not None and self.info is not None:
                    if self.spec and self.spec.model_path == request.model_path:
                        return self.info
                    raise errors.ModelLoadFailed(
                        f"this runner already serves '{self.spec.model_name if self.spec else '?'}'")
                spec = LoadSpec.from_json(
                    request.model_name, request.backend, request.model_path, request.config_json,
                    threads=request.threads or (os.cpu_count() or 1), context_size=request.context_size,
                    parallel=request.parallel, files=dict(request.files), board=self.board,
                )
                log.info("loading model '%s' with backend %s from %s", spec.model_name, spec.backend,
                         spec.model_path)
                started = time.perf_counter()
                backend = create_backend(spec.backend)
                description = backend.load(spec)
                elapsed = time.perf_counter() - started
                self.backend, self.spec = backend, spec
                self.info = _describe(description, elapsed)
                log.info("model '%s' loaded in %.2f s", spec.model_name, elapsed)
                return self.info

        return await _guard(context, load)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateReply]:
        spec = _generation_spec(request)
        produced, finished = 0, False
        try:
            async for chunk in self._loaded().agenerate(spec):
                produced += chunk.token_count
                reply = pb.GenerateReply(text=chunk.text, token_count=chunk.token_count)
                if chunk.logprobs:
                    reply.logprobs.extend(_logprob_message(item) for item in chunk.logprobs)
                if chunk.prompt_tokens and not chunk.finish_reason:  # the first token's: the prompt, counted
                    reply.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.prompt_tokens, cached_tokens=chunk.cached_tokens))
                if chunk.finish_reason:
                    finished = True
                    reply.finish_reason = chunk.finish_reason
                    reply.stop_sequence = chunk.stop_sequence
                    reply.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.prompt_tokens,
                                                  completion_tokens=chunk.completion_tokens,
                                                  cached_tokens=chunk.cached_tokens))
                    reply.timings.CopyFrom(pb.Timings(prompt_n=chunk.prompt_tokens - chunk.cached_tokens,
                                                      prompt_ms=chunk.prompt_ms,
                                                      predicted_n=chunk.completion_tokens,
                                                      predicted_ms=chunk.predicted_ms, draft_n=chunk.draft_n,
                                                      draft_n_accepted=chunk.draft_accepted))
                    _log_timings(spec, chunk)
                yield reply
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                log.info("request %s cancelled by the client after %d tokens", spec.request_id or "-", produced)
            raise
        except Exception as exc:
            await _abort(context, _as_hearth_error(exc))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeReply:
        return await _guard(context, lambda: pb.TokenizeReply(
            tokens=self._loaded().tokenize(request.text, request.add_special, request.parse_special)))

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeReply:
        return await _guard(context, lambda: pb.DetokenizeReply(
            text=self._loaded().detokenize(list(request.tokens))))

    async def _missing(self, what: str, context: grpc.aio.ServicerContext) -> Any:
        name = self.spec.backend if self.spec else "this runner"
        await _abort(context, errors.CapabilityNotSupported(f"backend '{name}' does not support {what}"))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedReply:
        def embed() -> pb.EmbedReply:
            inputs: list[str | list[int]] = [i.text if i.text or not i.tokens else list(i.tokens)
                                             for i in request.inputs]
            vectors, counts = self._loaded().embed(inputs, request.truncate, request.normalize)
            return pb.EmbedReply(
                embeddings=[pb.Embedding(values=vector.tolist(), token_count=count)
                            for vector, count in zip(vectors, counts, strict=True)],
                prompt_tokens=sum(counts))

        return await _guard(context, embed)

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankReply:
        def rerank() -> pb.RerankReply:
            backend = self._loaded()
            scores = backend.rerank(request.query, list(request.documents))
            tokens = sum(len(backend.tokenize(text, True, False)) for text in [request.query, *request.documents])
            return pb.RerankReply(scores=scores, prompt_tokens=tokens)

        return await _guard(context, rerank)

    async def DetectSpeech(self, request: pb.VadRequest, context: grpc.aio.ServicerContext) -> pb.VadReply:
        def detect() -> pb.VadReply:
            import numpy as np

            from hearth.backends.audio import decode

            backend = self._loaded()
            audio = decode(request.audio, 16_000) if request.audio else np.asarray(request.samples, dtype=np.float32)
            if not len(audio):
                raise errors.InvalidRequest("the audio is empty", param="audio")
            if not np.isfinite(audio).all():
                raise errors.InvalidRequest("the audio holds values that are not finite numbers", param="audio")
            options = {field: getattr(request, field) if request.HasField(field) else None
                       for field in ("threshold", "min_silence_ms", "speech_pad_ms", "min_speech_ms")}
            found = backend.detect_speech(audio, options)
            return pb.VadReply(segments=[pb.SpeechSegment(start=s, end=e) for s, e in found],
                               duration=len(audio) / 16_000)

        return await _guard(context, detect)

    async def Transcribe(self, request: pb.TranscribeRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TranscribeReply]:
        spec = TranscriptionSpec(
            audio=request.audio, language=request.language, prompt=request.prompt,
            temperature=request.temperature if request.HasField("temperature") else None,
            translate=request.translate, word_timestamps=request.word_timestamps)
        try:
            backend = self._loaded()
            async for item in iterate_in_thread(lambda cancelled: backend.transcribe(spec)):
                if isinstance(item, TranscriptionDone):
                    yield pb.TranscribeReply(done=True, language=item.language, duration=item.duration)
                else:
                    yield pb.TranscribeReply(segment=pb.Segment(
                        id=item.id, start=item.start, end=item.end, text=item.text,
                        words=[pb.Word(start=w.start, end=w.end, word=w.word, probability=w.probability)
                               for w in item.words],
                        avg_logprob=item.avg_logprob, no_speech_prob=item.no_speech_prob,
                        compression_ratio=item.compression_ratio, temperature=item.temperature, tokens=item.tokens))
        except Exception as exc:
            await _abort(context, _as_hearth_error(exc))

    async def Speak(self, request: pb.SpeakRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SpeakReply]:
        spec = SpeechSpec(text=request.text, voice=request.voice, speed=request.speed or 1.0,
                          response_format=request.response_format or "mp3")
        try:
            backend = self._loaded()
            async for piece in iterate_in_thread(lambda cancelled: backend.speak(spec)):
                yield pb.SpeakReply(audio=piece)
        except Exception as exc:
            await _abort(context, _as_hearth_error(exc))

    async def GenerateImage(self, request: pb.ImageRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ImageReply]:
        from hearth.backends.diffusers_backend import GeneratedImage, ImageProgress, ImageSpec

        spec = ImageSpec(
            prompt=request.prompt, negative_prompt=request.negative_prompt, width=request.width, height=request.height,
            steps=request.steps, seed=request.seed if request.HasField("seed") else None,
            guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None, n=request.n or 1,
            init_image=request.init_image, mask_image=request.mask_image,
            strength=request.strength if request.HasField("strength") else None)
        try:
            backend = self._loaded()
            async for item in iterate_in_thread(lambda cancelled: backend.generate_image(spec)):
                if isinstance(item, ImageProgress):
                    yield pb.ImageReply(step=item.step, total_steps=item.total)
                elif isinstance(item, GeneratedImage):
                    yield pb.ImageReply(png=item.png, index=item.index)
            yield pb.ImageReply(done=True)
        except Exception as exc:
            await _abort(context, _as_hearth_error(exc))

    def close(self) -> None:
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.backend.close()
            self.backend = None


def _log_timings(spec: GenerationSpec, chunk: Any) -> None:
    prompt_n = chunk.prompt_tokens - chunk.cached_tokens
    pp = prompt_n / (chunk.prompt_ms / 1000) if chunk.prompt_ms > 0 else 0.0
    tg = chunk.completion_tokens / (chunk.predicted_ms / 1000) if chunk.predicted_ms > 0 else 0.0
    log.info("request %s: prompt %d tokens (%d cached) at %.1f tok/s, generated %d tokens at %.1f tok/s (%s)",
             spec.request_id or "-", chunk.prompt_tokens, chunk.cached_tokens, pp, chunk.completion_tokens, tg,
             chunk.finish_reason)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the API process goes away, even if it was killed and could not stop us."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


async def _serve(address: str, parent_pid: int | None, cores_board: Path | None, secret: str) -> None:
    board = None
    if cores_board is not None:
        try:
            board = Board(cores_board)
        except OSError as exc:
            log.warning("cannot read the server's board of busy runners (%s): computing with all threads", exc)
    service = RunnerService(board)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
                             interceptors=[SecretCheck(secret)] if secret else None)
    pb_grpc.add_RunnerServicer_to_server(service, server)
    port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise SystemExit(f"cannot listen on {address}")
    if not address.startswith("unix:") and address.endswith(":0"):  # port 0: the one the system chose, announced
        address = f"{address[:-2]}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if parent_pid:
        _die_with_parent(parent_pid)
    await server.start()
    log.info("runner %d listening on %s", os.getpid(), address)
    print(json.dumps({"event": "listening", "address": address, "pid": os.getpid()}), flush=True)
    await stop.wait()
    log.info("runner %d stopping", os.getpid())
    await server.stop(grace=2.0)
    await asyncio.to_thread(service.close)
    if address.startswith("unix:"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.removeprefix("unix:"))
    # A model still loading (a native call nothing can interrupt) would keep the process alive until it is done,
    # as asyncio.run waits for its worker threads: with the server stopped and the socket gone, leave now.
    logging.shutdown()
    os._exit(0)


def serve(address: str, *, parent_pid: int | None = None, cores_board: Path | None = None, secret: str = "") -> None:
    """Serve until SIGTERM/SIGINT; `address` is `unix:/path` or `host:port`; with `secret`, every call needs it."""
    asyncio.run(_serve(address, parent_pid, cores_board, secret))
