"""Audio in and out for the speech backends (runner side), with PyAV: decode any upload, encode streamed speech."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from hearth.errors import InvalidRequest

# OpenAI's response formats: (container, codec, bit rate or None for the codec's default), all at OpenAI's 24 kHz.
# MP3 and AAC at 64 kbit/s mono: clean speech (LAME's default at this rate would be 32 kbit/s, audibly coarse).
RATE = 24_000
FORMATS: dict[str, tuple[str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", 64_000),
    "opus": ("ogg", "libopus", None),
    "aac": ("adts", "aac", 64_000),
    "flac": ("flac", "flac", None),
    "wav": ("wav", "pcm_s16le", None),
    "pcm": ("", "", None),  # raw 24 kHz 16-bit mono little-endian, as OpenAI defines it
    # For the Realtime API only (the speech route does not offer them): raw G.711 at 8 kHz, as telephony sends.
    "g711_ulaw": ("", "pcm_mulaw", None),
    "g711_alaw": ("", "pcm_alaw", None),
}
RAW_RATES = {"pcm": RATE, "g711_ulaw": 8_000, "g711_alaw": 8_000}
# Formats whose header holds the length, written once the whole is encoded: WAV, and FLAC, whose STREAMINFO would
# otherwise say "length unknown", which libsndfile (soundfile, many players) refuses to read.
WHOLE = ("wav", "flac")
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}


def decode(data: bytes, sample_rate: int = 16_000) -> np.ndarray:
    """Any audio file PyAV reads, as mono float32 at `sample_rate`; a clear 400 when it is not audio."""
    import av

    if not data:
        raise InvalidRequest("the audio file is empty", param="file")
    chunks: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file has no audio stream", param="file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InvalidRequest:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InvalidRequest(f"the file could not be decoded as audio: {exc}", param="file") from None
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise InvalidRequest("the file holds no audio samples (empty or truncated)", param="file")
    return np.concatenate(chunks).astype(np.float32)


class _Sink(io.RawIOBase):
    """A write-only, non-seekable stream: muxers then write as they go, never back."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class StreamEncoder:
    """16-bit mono PCM at the voice's rate in, the response format's bytes at 24 kHz (G.711: 8 kHz) out, piece by
    piece (WAV and FLAC whole, at the end: their headers hold the length)."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        import av

        if fmt not in FORMATS:
            raise InvalidRequest(f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
        container_format, codec, bit_rate = FORMATS[fmt]
        self.fmt = fmt
        self.in_rate = sample_rate
        self.out_rate = RAW_RATES.get(fmt, RATE)
        self.container = None
        self.raw_codec = None
        if fmt in RAW_RATES:
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=self.out_rate)
            if codec:
                self.raw_codec = av.CodecContext.create(codec, "w")
                self.raw_codec.sample_rate, self.raw_codec.layout, self.raw_codec.format = self.out_rate, "mono", "s16"
            return
        self.sink: Any = io.BytesIO() if fmt in WHOLE else _Sink()
        self.container = av.open(self.sink, mode="w", format=container_format)
        self.stream = self.container.add_stream(codec, rate=self.out_rate, layout="mono")
        if bit_rate:
            self.stream.codec_context.bit_rate = bit_rate
        self.resampler = av.AudioResampler(format=self.stream.codec_context.format.name, layout="mono",
                                           rate=self.out_rate)

    def _frames(self, pcm: bytes | None) -> list[Any]:
        import av

        if pcm is None:
            return self.resampler.resample(None)
        samples = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.in_rate
        return self.resampler.resample(frame)

    def _encode(self, pcm: bytes | None) -> bytes | None:
        """Raw PCM (or G.711) for raw output; otherwise the frames go into the container and None is returned."""
        frames = self._frames(pcm)
        if self.raw_codec is not None:
            return b"".join(bytes(packet) for frame in frames for packet in self.raw_codec.encode(frame))
        if self.container is None:
            return b"".join(bytes(f.to_ndarray().astype("<i2").tobytes()) for f in frames)
        for frame in frames:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        return None

    def feed(self, pcm: bytes) -> bytes:
        raw = self._encode(pcm)
        if raw is not None:
            return raw
        return b"" if self.fmt in WHOLE else self.sink.take()

    def close(self) -> bytes:
        raw = self._encode(None)
        if raw is not None:
            return raw
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        return self.sink.getvalue() if self.fmt in WHOLE else self.sink.take()
