"""Text to speech with Piper voices (ONNX): the voice's `.onnx` file with its `.onnx.json` beside it.

Speech is produced sentence by sentence and encoded as it comes, so a long text starts playing quickly. OpenAI's
voice names all speak with the voice's default speaker unless the YAML maps them (`voices: {alloy: SPEAKER}`,
a speaker name or number of a multi-speaker voice); the voice's own speaker names work as well. `noise_scale` and
`noise_w` override the voice's variation (0 and 0: the same text gives the same audio every time).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hearth.backends.audio import StreamEncoder
from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import LoadSpec, ModelDescription, SpeechSpec, need
from hearth.errors import InvalidRequest, ModelLoadFailed

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")


class Backend(BaseBackend):
    name = "piper"

    def __init__(self) -> None:
        self.voice: Any = None
        self.sample_rate = 22_050
        self.speakers: dict[str, int | None] = {}
        self.noise: dict[str, float] = {}
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        config_path = path.with_name(path.name + ".json")
        if not path.is_file() or path.suffix != ".onnx":
            raise ModelLoadFailed(f"{path.name} is not a Piper voice (an .onnx file)")
        if not config_path.is_file():
            raise ModelLoadFailed(f"{config_path.name} is missing: a Piper voice needs its .onnx.json beside it")
        piper, onnxruntime = need("speech", "piper", "onnxruntime", why="a Piper voice")
        from piper.config import PiperConfig

        # Built here rather than by PiperVoice.load, whose onnxruntime session takes every core: the voice computes
        # with the model's `threads`, as every other backend does.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        try:
            self.voice = piper.PiperVoice(
                config=PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8"))),
                session=onnxruntime.InferenceSession(str(path), sess_options=options,
                                                     providers=["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime and json errors
            raise ModelLoadFailed(f"Piper could not load {path.name}: {exc}") from None
        self.sample_rate = int(self.voice.config.sample_rate)
        # Piper's randomness (pitch and timing variation); 0 and 0 make the same text sound the same every time.
        self.noise = {key: float(spec.config[name]) for key, name in (("noise_scale", "noise_scale"),
                                                                       ("noise_w_scale", "noise_w"))
                      if spec.config.get(name) is not None}
        own = dict(self.voice.config.speaker_id_map or {})
        self.speakers = {"default": None, **{name: None for name in OPENAI_VOICES}, **own}
        for name, target in (spec.config.get("voices") or {}).items():
            speaker = own.get(str(target), target)
            if not isinstance(speaker, int) or not 0 <= speaker < max(self.voice.config.num_speakers, 1):
                raise ModelLoadFailed(f"voices.{name} names speaker {target!r}, which this voice does not have")
            self.speakers[str(name)] = speaker
        return ModelDescription(backend=self.name, capabilities=["speak"], parallel=1, voices=sorted(self.speakers),
                                metadata={"sample_rate": str(self.sample_rate)})

    def speak(self, spec: SpeechSpec) -> Iterator[bytes]:
        from piper import SynthesisConfig

        voice = spec.voice or "default"
        if voice not in self.speakers:
            raise InvalidRequest(f"unknown voice '{voice}'; this model has: {', '.join(sorted(self.speakers))}",
                                 param="voice")
        encoder = StreamEncoder(spec.response_format, self.sample_rate)
        scale = self.voice.config.length_scale or 1.0
        config = SynthesisConfig(speaker_id=self.speakers[voice], length_scale=scale / spec.speed, **self.noise)
        with self._lock:
            for chunk in self.voice.synthesize(spec.text, config):
                piece = encoder.feed(chunk.audio_int16_bytes)
                if piece:
                    yield piece
        tail = encoder.close()
        if tail:
            yield tail
