"""The Realtime API's audio formats: pcm16 at 24 kHz, and G.711 (mu-law and A-law, 8 kHz) as telephone lines send.

Input audio is kept as 16-bit PCM at the format's own rate (VAD and whisper resample what they read); G.711 input is
expanded here with the ITU-T G.711 tables, written out below because the standard library's `audioop` is deprecated
(gone in Python 3.13) and the API process holds no numpy. Output audio comes from the speech runner already in the
format (PyAV's pcm_mulaw and pcm_alaw encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AudioFormat:
    type: str  # as the GA API names it: audio/pcm, audio/pcmu, audio/pcma
    rate: int
    sample_bytes: int  # on the wire
    speech_format: str  # the speech runner's response_format for it

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {"type": self.type}

    def to_pcm16(self, data: bytes) -> bytes:
        """Wire bytes as 16-bit little-endian PCM at `rate`: each G.711 byte's low and high output bytes by one
        `bytes.translate` each, interleaved by slice assignment (C speed: an event's 3 MB of G.711 in milliseconds,
        where a Python loop held the event loop for a quarter of a second)."""
        tables = EXPAND.get(self.type)
        if tables is None:
            return data
        out = bytearray(2 * len(data))
        out[0::2], out[1::2] = data.translate(tables[0]), data.translate(tables[1])
        return bytes(out)

    def ms(self, wire_bytes: int) -> int:
        return wire_bytes * 1000 // (self.sample_bytes * self.rate)


PCM = AudioFormat("audio/pcm", 24_000, 2, "pcm")
PCMU = AudioFormat("audio/pcmu", 8_000, 1, "g711_ulaw")
PCMA = AudioFormat("audio/pcma", 8_000, 1, "g711_alaw")
# The GA names, and the beta's strings (input_audio_format / output_audio_format) that clients still send.
FORMATS = {"audio/pcm": PCM, "pcm16": PCM, "audio/pcmu": PCMU, "g711_ulaw": PCMU, "audio/pcma": PCMA,
           "g711_alaw": PCMA}


def _ulaw(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + 0x84) << ((byte & 0x70) >> 4)
    return 0x84 - magnitude if byte & 0x80 else magnitude - 0x84


def _alaw(byte: int) -> int:
    byte ^= 0x55
    mantissa, segment = byte & 0x0F, (byte & 0x70) >> 4
    magnitude = (mantissa << 4) + 8 if segment == 0 else ((mantissa << 4) + 0x108) << (segment - 1)
    return magnitude if byte & 0x80 else -magnitude


def _tables(expand: Any) -> tuple[bytes, bytes]:
    """bytes.translate tables: each code's 16-bit little-endian sample, its low bytes, then its high bytes."""
    samples = [expand(code).to_bytes(2, "little", signed=True) for code in range(256)]
    return bytes(s[0] for s in samples), bytes(s[1] for s in samples)


EXPAND = {"audio/pcmu": _tables(_ulaw), "audio/pcma": _tables(_alaw)}
