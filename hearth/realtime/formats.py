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
        """Wire bytes as 16-bit little-endian PCM at `rate`."""
        table = EXPAND.get(self.type)
        return data if table is None else b"".join(table[byte] for byte in data)

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


EXPAND = {"audio/pcmu": [_ulaw(b).to_bytes(2, "little", signed=True) for b in range(256)],
          "audio/pcma": [_alaw(b).to_bytes(2, "little", signed=True) for b in range(256)]}
