"""Speech to text with whisper.cpp (LocalAI's `whisper` backend): a ggml `.bin` model file, through pywhispercpp.

The upload is decoded with PyAV (as for faster-whisper), then whisper.cpp runs in a thread of its own while the
segments it recognises are handed on one by one (its new-segment callback), so a stream shows text as it comes.
Words and their times come from whisper.cpp's token timestamps. Each transcription computes with the model's
`threads`, fewer while other runners work (hearth/cores.py). YAML options: `beam_size` (default: greedy with
best-of 5, as whisper.cpp's own CLI), `vad_filter` is faster-whisper's and is not used here.
"""

from __future__ import annotations

import math
import queue
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hearth.backends.audio import decode
from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import (
    LoadSpec,
    ModelDescription,
    TranscribedSegment,
    TranscribedWord,
    TranscriptionDone,
    TranscriptionSpec,
    need,
)
from hearth.cores import Share
from hearth.errors import BackendError, InvalidRequest, ModelLoadFailed

SAMPLE_RATE = 16_000
GGML_MAGIC = b"lmgg"  # 0x67676d6c, little-endian, as whisper.cpp writes it
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_END = object()


class _Log:
    """whisper.cpp's log lines while loading, so a failed load can say why."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, level: int, text: str, *_: Any) -> None:
        self.lines.append(str(text).strip())
        del self.lines[:-50]

    def reason(self) -> str:
        wanted = [line for line in self.lines if any(w in line for w in ("wrong", "failed", "invalid", "error",
                                                                       "expected", "unknown", "not"))]
        return "; ".join(wanted[-3:]) or "unknown reason"


class Backend(BaseBackend):
    name = "whisper-cpp"

    def __init__(self) -> None:
        self.model: Any = None
        self.pw: Any = None
        self.multilingual = False
        self.share = Share(1)
        self.options: dict[str, Any] = {}
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        try:
            with path.open("rb") as file:
                magic = file.read(4)
        except OSError as exc:
            raise ModelLoadFailed(f"{path.name} cannot be read: {exc.strerror or exc}") from None
        if magic != GGML_MAGIC:
            kind = "a GGUF file" if magic == b"GGUF" else "not a whisper.cpp model"
            raise ModelLoadFailed(f"{path.name} is {kind}: whisper.cpp loads ggml .bin files (ggml-base.bin and "
                                  f"the like); a CTranslate2 folder goes to backend faster-whisper")
        model_module, pw = need("speech", "pywhispercpp.model", "_pywhispercpp", why="a whisper.cpp model")
        log = _Log()
        pw.whisper_log_set(log)
        try:
            self.model = model_module.Model(str(path), n_threads=spec.threads, print_progress=False,
                                            print_realtime=False, print_timestamps=False,
                                            context_params={"use_gpu": False})
        except Exception as exc:  # pywhispercpp raises for unreadable files
            raise ModelLoadFailed(f"whisper.cpp could not load {path.name}: {exc}") from None
        finally:
            pw.whisper_log_set(None)
        if self.model._ctx is None:  # pywhispercpp does not check: any use of a failed context crashes
            self.model = None
            raise ModelLoadFailed(f"whisper.cpp could not load {path.name}: {log.reason()}")
        if any("no tensors loaded" in line for line in log.lines):  # whisper.cpp's stand-in for its own tests
            self.model = None
            raise ModelLoadFailed(f"{path.name} holds no weights (a truncated download, or a test stub)")
        self.pw = pw
        self.multilingual = bool(pw.whisper_is_multilingual(self.model._ctx))
        self.share = spec.share()
        beam = int(spec.config.get("beam_size") or 0)
        self.options = {"beam_search": {"beam_size": beam, "patience": -1.0}} if beam > 1 else \
            {"greedy": {"best_of": 5}}
        capabilities = ["transcribe"] + (["translate"] if self.multilingual else [])
        return ModelDescription(backend=self.name, capabilities=capabilities, parallel=1,
                                architecture=str(pw.whisper_model_type_readable(self.model._ctx)),
                                metadata={"multilingual": str(self.multilingual).lower()})

    def transcribe(self, spec: TranscriptionSpec) -> Iterator[TranscribedSegment | TranscriptionDone]:
        assert self.model is not None
        if spec.translate and not self.multilingual:
            raise InvalidRequest("this Whisper model is English-only, so it cannot translate; use a multilingual "
                                 "model such as ggml-base.bin", param="model")
        language = spec.language.strip().lower()
        if language and self.pw.whisper_lang_id(language) < 0:
            raise InvalidRequest(f"language: '{language}' is not a language Whisper knows", param="language")
        if language and not self.multilingual and language != "en":
            raise InvalidRequest(f"this Whisper model is English-only; language '{language}' is not available",
                                 param="language")
        audio = decode(spec.audio, SAMPLE_RATE)
        temperature = spec.temperature if spec.temperature is not None else 0.0
        params = {"language": language or ("auto" if self.multilingual else "en"), "translate": spec.translate,
                  "initial_prompt": spec.prompt or "", "temperature": temperature,  # params persist: always set
                  # A temperature given by the client is used alone, as OpenAI does; else whisper's fallback.
                  "temperature_inc": 0.0 if spec.temperature is not None else 0.2,
                  "token_timestamps": True, "n_threads": self.share.threads(), "no_context": True,
                  **self.options}
        with self._lock:
            yield from self._run(audio, params)

    def _run(self, audio: Any, params: dict[str, Any]) -> Iterator[TranscribedSegment | TranscriptionDone]:
        found: queue.Queue = queue.Queue()
        stop = threading.Event()
        ctx, pw = self.model._ctx, self.pw
        emitted = 0
        duration = len(audio) / SAMPLE_RATE

        def on_segment(_: Any) -> None:  # called by whisper.cpp (with the GIL) as each segment is ready
            nonlocal emitted
            total = pw.whisper_full_n_segments(ctx)
            for index in range(emitted, total):
                found.put(self._segment(index, duration))
            emitted = total

        def work() -> None:
            try:
                self.model.transcribe(audio, new_segment_callback=on_segment, abort_callback=stop.is_set, **params)
                found.put(_END)
            except BaseException as exc:  # handed to the reading side
                found.put(exc)

        thread = threading.Thread(target=work, name="whisper-cpp", daemon=True)
        thread.start()
        try:
            while (item := found.get()) is not _END:
                if isinstance(item, BaseException):
                    raise BackendError(f"whisper.cpp failed: {item}") from None
                yield item
        finally:
            stop.set()
            thread.join()
        language = pw.whisper_lang_str(pw.whisper_full_lang_id(ctx)) if self.multilingual else "en"
        yield TranscriptionDone(language=language or "en", duration=duration)

    def _segment(self, index: int, duration: float) -> TranscribedSegment:
        """Segment `index` of the last run, with its words; times never run past the audio's end."""
        ctx, pw = self.model._ctx, self.pw
        text = _text(pw.whisper_full_get_segment_text(ctx, index))
        def seconds(centiseconds: int) -> float:
            return min(centiseconds / 100, duration)

        start = seconds(pw.whisper_full_get_segment_t0(ctx, index))
        end = seconds(pw.whisper_full_get_segment_t1(ctx, index))
        eot = pw.whisper_token_eot(ctx)
        words: list[TranscribedWord] = []
        tokens, logprobs = [], []
        for position in range(pw.whisper_full_n_tokens(ctx, index)):
            data = pw.whisper_full_get_token_data(ctx, index, position)
            if data.id >= eot:  # special and timestamp tokens
                continue
            tokens.append(int(data.id))
            logprobs.append(float(data.plog))
            piece = _text(pw.whisper_full_get_token_text(ctx, index, position))
            if not words or piece.startswith(" "):
                words.append(TranscribedWord(seconds(data.t0), seconds(data.t1), piece, float(data.p)))
            else:  # a word continues over several tokens
                last = words[-1]
                words[-1] = TranscribedWord(last.start, seconds(data.t1), last.word + piece,
                                            min(last.probability, float(data.p)))
        encoded = text.encode("utf-8")
        ratio = len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0
        average = sum(logprobs) / len(logprobs) if logprobs else 0.0
        return TranscribedSegment(id=index, start=start, end=max(end, start), text=text,
                                  words=[w for w in words if w.word.strip()],
                                  avg_logprob=average if math.isfinite(average) else 0.0, no_speech_prob=0.0,
                                  compression_ratio=ratio, temperature=0.0, tokens=tokens)

    def close(self) -> None:
        self.model = None


def _text(value: bytes | str) -> str:
    """pywhispercpp hands some texts over as bytes (a token may hold part of a UTF-8 character) and some as str."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
