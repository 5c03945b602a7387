"""Speech to text with faster-whisper (CTranslate2): a Whisper model folder (model.bin, config.json, tokenizer).

Options from the model YAML: `vad_filter` (skip silence with Silero VAD before decoding), `beam_size` (default 5),
`compute_type` (default int8).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

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
from hearth.errors import InvalidRequest, ModelLoadFailed

SAMPLE_RATE = 16_000


class Backend(BaseBackend):
    name = "faster-whisper"

    def __init__(self) -> None:
        self.model = None
        self.multilingual = False
        self.options: dict = {}
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        folder = Path(spec.model_path)
        if not (folder / "model.bin").is_file():
            raise ModelLoadFailed(f"{folder.name} is not a faster-whisper model folder (no model.bin in it)")
        (faster_whisper,) = need("speech", "faster_whisper", why="a faster-whisper model")
        try:
            self.model = faster_whisper.WhisperModel(str(folder), device="cpu", cpu_threads=spec.threads,
                                      compute_type=str(spec.config.get("compute_type") or "int8"))
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError for broken folders
            raise ModelLoadFailed(f"faster-whisper could not load {folder.name}: {exc}") from None
        self.multilingual = bool(self.model.model.is_multilingual)
        self.options = {"vad_filter": bool(spec.config.get("vad_filter", False)),
                        "beam_size": int(spec.config.get("beam_size") or 5)}
        capabilities = ["transcribe"] + (["translate"] if self.multilingual else [])
        return ModelDescription(backend=self.name, capabilities=capabilities, parallel=1,
                                metadata={"multilingual": str(self.multilingual).lower()})

    def transcribe(self, spec: TranscriptionSpec) -> Iterator[TranscribedSegment | TranscriptionDone]:
        assert self.model is not None
        if spec.translate and not self.multilingual:
            raise InvalidRequest("this Whisper model is English-only, so it cannot translate; use a multilingual "
                                 "model such as whisper-base", param="model")
        language = spec.language.strip().lower() or None
        if language and not self.multilingual and language != "en":
            raise InvalidRequest(f"this Whisper model is English-only; language '{language}' is not available",
                                 param="language")
        audio = decode(spec.audio, SAMPLE_RATE)
        temperature = [spec.temperature] if spec.temperature is not None else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        with self._lock:
            try:
                segments, info = self.model.transcribe(
                    audio, language=language, task="translate" if spec.translate else "transcribe",
                    initial_prompt=spec.prompt or None, temperature=temperature,
                    word_timestamps=spec.word_timestamps, vad_filter=self.options["vad_filter"],
                    beam_size=self.options["beam_size"])
            except ValueError as exc:  # an unknown language code
                raise InvalidRequest(f"language: {exc}", param="language") from None
            for segment in segments:  # decoded lazily: each segment is handed on as soon as it is ready
                yield TranscribedSegment(
                    id=segment.id, start=segment.start, end=segment.end, text=segment.text,
                    words=[TranscribedWord(w.start, w.end, w.word, w.probability) for w in segment.words or []],
                    avg_logprob=segment.avg_logprob, no_speech_prob=segment.no_speech_prob,
                    compression_ratio=segment.compression_ratio, temperature=segment.temperature or 0.0,
                    tokens=list(segment.tokens))
        yield TranscriptionDone(language=info.language, duration=info.duration)
