"""Voice activity detection with Silero VAD (LocalAI's `silero-vad` backend): its ONNX model on onnxruntime.

Two exports of the model are read, told apart by their inputs: Silero's own (`input`, `state`, `sr`: the file
LocalAI's gallery names, onnx-community/silero-vad) and the one faster-whisper ships (`input` with 64 samples of
context in front, `h`, `c`: `silero_vad_v6.onnx`). The audio is read in 32 ms windows (512 samples at 16 kHz),
each giving a speech probability, and the probabilities become segments the way Silero's `get_speech_timestamps`
makes them: speech starts at `threshold`, ends after `min_silence_ms` below `threshold - 0.15`, is dropped when
shorter than `min_speech_ms`, and is padded by `speech_pad_ms` on both sides. Written here rather than taken from
faster-whisper, whose function is bound to its own bundled model. YAML options: `threshold`, `min_silence_ms`,
`speech_pad_ms`, `min_speech_ms` (a request's own values win).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import LoadSpec, ModelDescription, need
from hearth.errors import ModelLoadFailed

SAMPLE_RATE = 16_000
WINDOW = 512
CONTEXT = 64  # samples of the previous window the model reads in front of each (Silero v5 and later)
DEFAULTS = {"threshold": 0.5, "min_silence_ms": 100, "speech_pad_ms": 30, "min_speech_ms": 250}


@dataclass
class VadOptions:
    threshold: float = 0.5
    min_silence_ms: int = 100
    speech_pad_ms: int = 30
    min_speech_ms: int = 250


class Backend(BaseBackend):
    name = "silero-vad"

    def __init__(self) -> None:
        self.session: Any = None
        self.official = True
        self.defaults = VadOptions()
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        if not path.is_file() or path.suffix != ".onnx":
            raise ModelLoadFailed(f"{path.name} is not a Silero VAD model (an .onnx file)")
        (onnxruntime,) = need("embeddings", "onnxruntime", why="Silero VAD")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # a window is tiny: one thread is fastest, and leaves the cores be
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own errors for files it cannot read
            raise ModelLoadFailed(f"onnxruntime could not load {path.name}: {exc}") from None
        names = {i.name for i in self.session.get_inputs()}
        if {"input", "state", "sr"} <= names:
            self.official = True
        elif {"input", "h", "c"} <= names:
            self.official = False
        else:
            raise ModelLoadFailed(f"{path.name} is not a Silero VAD model: its inputs are {sorted(names)}, not "
                                  f"input/state/sr (Silero's export) or input/h/c (faster-whisper's)")
        self.defaults = VadOptions(**{key: type(value)(spec.config.get(key, value))
                                      for key, value in DEFAULTS.items()})
        return ModelDescription(backend=self.name, capabilities=["vad"], parallel=1,
                                metadata={"export": "silero" if self.official else "faster-whisper"})

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """The speech probability of each 512-sample window."""
        count = -(-len(audio) // WINDOW)
        padded = np.zeros(count * WINDOW, dtype=np.float32)
        padded[: len(audio)] = audio
        windows = padded.reshape(count, WINDOW)
        context = np.concatenate([np.zeros((1, CONTEXT), dtype=np.float32), windows[:-1, -CONTEXT:]])
        frames = np.concatenate([context, windows], axis=1)  # each window with the end of the one before
        out = np.zeros(count, dtype=np.float32)
        with self._lock:
            if self.official:
                state = np.zeros((2, 1, 128), dtype=np.float32)
                rate = np.array(SAMPLE_RATE, dtype=np.int64)
                for index, frame in enumerate(frames):
                    probability, state = self.session.run(None, {"input": frame[None, :], "state": state,
                                                                 "sr": rate})
                    out[index] = float(np.asarray(probability).reshape(-1)[0])
            else:  # faster-whisper's export takes the windows in batches, its state carried between them
                h = np.zeros((1, 1, 128), dtype=np.float32)
                c = np.zeros((1, 1, 128), dtype=np.float32)
                for start in range(0, count, 10_000):
                    probability, h, c = self.session.run(None, {"input": frames[start:start + 10_000], "h": h,
                                                                "c": c})
                    out[start:start + len(frames[start:start + 10_000])] = np.asarray(probability).reshape(-1)
        return out

    def detect_speech(self, audio: np.ndarray, options: dict[str, Any]) -> list[tuple[float, float]]:
        given = {key: value for key, value in options.items() if value is not None}
        chosen = VadOptions(**{**self.defaults.__dict__, **given})
        return segments(self.probabilities(audio), len(audio), chosen)


def segments(probabilities: np.ndarray, samples: int, options: VadOptions) -> list[tuple[float, float]]:
    """Speech segments (seconds) from window probabilities, as Silero's get_speech_timestamps makes them."""
    low = max(options.threshold - 0.15, 0.01)
    min_silence = SAMPLE_RATE * options.min_silence_ms / 1000
    min_speech = SAMPLE_RATE * options.min_speech_ms / 1000
    pad = int(SAMPLE_RATE * options.speech_pad_ms / 1000)
    found: list[list[int]] = []
    start: int | None = None
    silence_from: int | None = None
    for index, probability in enumerate(probabilities):
        at = index * WINDOW
        if probability >= options.threshold:
            silence_from = None
            if start is None:
                start = at
        elif start is not None and probability < low:
            silence_from = at if silence_from is None else silence_from
            if at + WINDOW - silence_from >= min_silence:
                if silence_from - start >= min_speech:
                    found.append([start, silence_from])
                start, silence_from = None, None
    if start is not None and samples - start >= min_speech:
        found.append([start, samples])
    for number, segment in enumerate(found):  # pad, without overlapping the neighbours
        before = found[number - 1][1] if number else 0
        after = found[number + 1][0] if number + 1 < len(found) else samples
        segment[0] = max(before, segment[0] - pad)
        segment[1] = min(after, segment[1] + pad)
    return [(round(s / SAMPLE_RATE, 3), round(e / SAMPLE_RATE, 3)) for s, e in found]
