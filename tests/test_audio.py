"""Speech on real models: Piper (en_US-joe-medium) speaks, faster-whisper (tiny.en, base) transcribes."""

from __future__ import annotations

import io
import json
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import openai
import pytest
import soundfile

from hearth.api.openai.audio import srt, timestamp, vtt
from hearth.backends.audio import MEDIA_TYPES as MEDIA
from hearth.gallery.builtin import install
from hearth.runner import hearth_pb2 as pb
from tests.conftest import CACHE_DIR, HearthServer, write_yaml

pytestmark = pytest.mark.real_model

SENTENCE = "The quick brown fox jumps over the lazy dog."
STORY = ("Hearth runs on your own machine. It answers in many voices. Each sentence is spoken as soon as it is "
         "ready. The last one comes at the end.")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def duration_of(data: bytes) -> float:
    """Decode any audio with PyAV and return its length in seconds."""
    samples, rate = 0, 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return samples / rate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("speech-models")
    for name in ("whisper-tiny.en", "whisper-base", "en_US-joe-medium"):
        install(name, models, CACHE_DIR)
    write_yaml(models, "steady", {"name": "steady", "backend": "piper",
                                  "parameters": {"model": "en_US-joe-medium.onnx"}, "noise_scale": 0, "noise_w": 0})
    write_yaml(models, "tiny-vad", {"name": "tiny-vad", "backend": "faster-whisper",
                                    "parameters": {"model": "whisper-tiny.en"}, "vad_filter": True})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def spoken(server: HearthServer) -> bytes:
    """The sentence spoken by the default voice with its variation off ('steady'): the same audio every run. With
    the variation on, one run in a few dozen came out so that whisper-tiny heard "lizzy" for "lazy"."""
    response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": SENTENCE, "voice": "alloy",
                                                            "response_format": "wav"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    return response.content


def transcribe(server: HearthServer, audio: bytes, model: str = "whisper-tiny.en", path: str = "transcriptions",
               **fields: str) -> tuple[int, bytes, str]:
    response = server.http().post(f"/v1/audio/{path}", files={"file": ("speech.wav", audio, "audio/wav")},
                                  data={"model": model, **fields})
    return response.status_code, response.content, response.headers.get("content-type", "")


def test_round_trip_piper_to_whisper(server: HearthServer, spoken: bytes) -> None:
    with wave.open(io.BytesIO(spoken)) as reader:
        assert reader.getframerate() == 24000 and reader.getnchannels() == 1 and reader.getsampwidth() == 2
        assert 1.5 < reader.getnframes() / 24000 < 6
    status, body, _ = transcribe(server, spoken)
    assert status == 200
    assert words(json.loads(body)["text"]) == words(SENTENCE)


def decoded(data: bytes) -> tuple[int, float, int]:
    """PyAV (FFmpeg's decoders): the stream's stated rate, its decoded length in seconds, its stated bit rate."""
    samples, rate = 0, 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        stated = stream.codec_context.sample_rate
        bit_rate = stream.codec_context.bit_rate or stream.bit_rate or 0
        for frame in container.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate
    return stated, samples / rate, bit_rate


def test_every_speech_format_decodes(server: HearthServer) -> None:
    """With Piper's variation off ('steady'), the same text gives the same audio: every format holds it, at OpenAI's
    24 kHz, readable by FFmpeg's decoders (PyAV) and by libsndfile (soundfile: libmpg123, libopus, libFLAC) where
    it reads that format (all but AAC)."""
    def speak(fmt: str) -> bytes:
        response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": SENTENCE,
                                                                "response_format": fmt})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == MEDIA[fmt]
        return response.content

    wav = speak("wav")
    assert speak("wav") == wav
    rate, seconds, _ = decoded(wav)
    assert rate == 24_000 and seconds > 1.5
    for fmt in ("mp3", "opus", "aac", "flac", "wav"):
        data = speak(fmt)
        rate, length, bit_rate = decoded(data)
        # Lossy encoders add their priming and a last partial frame (no gapless header in a stream): < 0.12 s.
        assert length == pytest.approx(seconds, abs=0.12 if fmt in ("mp3", "opus", "aac") else 0.001), fmt
        assert rate == 24_000 or (fmt == "opus" and rate == 48_000), fmt  # Opus always decodes at 48 kHz
        if fmt in ("mp3", "aac"):
            assert bit_rate >= 48_000, (fmt, bit_rate)  # clean speech, not LAME's 32 kbit/s default
        if fmt != "aac":
            samples, sf_rate = soundfile.read(io.BytesIO(data), dtype="float32")
            assert sf_rate == 24_000, fmt  # (an Ogg Opus header states the input rate)
            assert len(samples) / sf_rate == pytest.approx(seconds, abs=0.12), fmt
            assert np.abs(samples).max() > 0.05, fmt  # speech, not silence
    pcm = speak("pcm")
    assert len(pcm) % 2 == 0
    assert len(pcm) / 2 / 24000 == pytest.approx(seconds, abs=0.05)  # 24 kHz 16-bit mono
    default = server.http().post("/v1/audio/speech", json={"model": "tts-1", "input": SENTENCE})
    assert default.headers["content-type"] == "audio/mpeg"  # mp3 by default, as OpenAI


def test_speed_changes_the_length(server: HearthServer) -> None:
    def seconds(speed: float) -> float:
        response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": SENTENCE,
                                                                "speed": speed, "response_format": "wav"})
        return duration_of(response.content)

    normal = seconds(1.0)
    assert seconds(2.0) < 0.7 * normal < normal < 0.7 * seconds(0.5)  # (pauses do not scale with speed)


def test_speech_streams_sentence_by_sentence(server: HearthServer) -> None:
    arrivals = []
    with server.http().stream("POST", "/v1/audio/speech", json={"model": "tts-1", "input": STORY,
                                                                "response_format": "pcm"}) as response:
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), len(chunk)))
    assert len(arrivals) >= 2, "the audio came in one piece"
    assert sum(n for _, n in arrivals) > 0


def test_every_transcription_format(server: HearthServer, spoken: bytes) -> None:
    status, body, media = transcribe(server, spoken, response_format="text")
    assert status == 200 and media.startswith("text/plain") and words(body.decode()) == words(SENTENCE)
    status, body, media = transcribe(server, spoken, response_format="srt")
    blocks = body.decode().strip().split("\n\n")
    first = blocks[0].splitlines()
    assert first[0] == "1" and re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", first[1])
    assert words(" ".join(b.splitlines()[2] for b in blocks)) == words(SENTENCE)
    status, body, media = transcribe(server, spoken, response_format="vtt")
    text = body.decode()
    assert text.startswith("WEBVTT\n\n")
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$", text, re.M)
    status, body, media = transcribe(server, spoken, response_format="verbose_json",
                                     **{"timestamp_granularities[]": "word"})
    verbose = json.loads(body)
    assert verbose["language"] == "english" and verbose["task"] == "transcribe"
    assert verbose["duration"] == pytest.approx(duration_of(spoken), abs=0.1)
    assert verbose["segments"][0]["id"] == 0 and verbose["segments"][0]["start"] == 0.0
    assert [w["word"].lower().strip(".,") for w in verbose["words"]] == words(SENTENCE)
    ends = [w["end"] for w in verbose["words"]]
    assert ends == sorted(ends) and ends[-1] <= verbose["duration"] + 0.1


def test_timestamps_past_a_minute_and_an_hour() -> None:
    assert timestamp(65.25, ",") == "00:01:05,250"
    assert timestamp(3725.5, ".") == "01:02:05.500"
    assert timestamp(360000.001, ",") == "100:00:00,001"
    segment = pb.Segment(start=3599.9, end=3661.04, text=" Late words.")
    assert srt([segment]) == "1\n00:59:59,900 --> 01:01:01,040\nLate words.\n"
    assert vtt([segment]) == "WEBVTT\n\n00:59:59.900 --> 01:01:01.040\nLate words.\n"


def test_long_audio_with_silence_keeps_true_times(server: HearthServer, spoken: bytes) -> None:
    """Speech, 62 s of silence, speech: the second sentence is timed after the first minute (VAD on)."""
    with wave.open(io.BytesIO(spoken)) as reader:
        rate, frames = reader.getframerate(), reader.readframes(reader.getnframes())
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(frames + b"\0\0" * rate * 62 + frames)
    for model in ("whisper-tiny.en", "tiny-vad"):
        status, body, _ = transcribe(server, buffer.getvalue(), model=model, response_format="srt")
        assert status == 200
        text = body.decode()
        assert words(text).count("fox") == 2, text
        times = re.findall(r"(\d\d):(\d\d):(\d\d),(\d{3})", text)
        seconds = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in times]
        assert 65 < seconds[-1] < 70, text  # the second sentence ends at about 69 s: 00:01:0x



def test_streamed_transcription(server: HearthServer, spoken: bytes) -> None:
    events = []
    with server.http().stream("POST", "/v1/audio/transcriptions", files={"file": ("a.wav", spoken, "audio/wav")},
                              data={"model": "whisper-tiny.en", "stream": "true"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["type"] == "transcript.text.done"
    assert all(e["type"] == "transcript.text.delta" for e in events[:-1]) and len(events) >= 2
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    assert words(events[-1]["text"]) == words(SENTENCE)


def test_official_client(server: HearthServer, spoken: bytes, tmp_path: Path) -> None:
    client = server.client()
    result = client.audio.transcriptions.create(model="whisper-tiny.en", file=("speech.wav", spoken))
    assert words(result.text) == words(SENTENCE)
    translated = client.audio.translations.create(model="whisper-1", file=("speech.wav", spoken))
    assert len(set(words(translated.text)) & set(words(SENTENCE))) >= 5
    target = tmp_path / "speech.mp3"
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=SENTENCE) as response:
        response.stream_to_file(target)
    assert duration_of(target.read_bytes()) > 1.5


@pytest.mark.parametrize(("audio", "words_in_message"), [
    (b"", "empty"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "decode"),
    (b"this is just some text, not audio at all " * 20, "decode"),
])
def test_bad_audio_is_400(server: HearthServer, audio: bytes, words_in_message: str) -> None:
    status, body, _ = transcribe(server, audio)
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["param"] == "file" and words_in_message in error["message"]


def test_truncated_audio_is_400_or_shorter(server: HearthServer, spoken: bytes) -> None:
    status, body, _ = transcribe(server, spoken[:60])
    assert status == 400 and json.loads(body)["error"]["param"] == "file"


def test_oversized_upload_is_413(server: HearthServer) -> None:
    status, _body, _ = transcribe(server, b"\0" * (26 * 1024 * 1024))
    assert status == 413


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": "docx"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_transcription_fields(server: HearthServer, spoken: bytes, fields: dict, param: str) -> None:
    status, body, _ = transcribe(server, spoken, **fields)
    assert status == 400 and json.loads(body)["error"]["param"] == param


def test_english_only_model_cannot_translate(server: HearthServer, spoken: bytes) -> None:
    status, body, _ = transcribe(server, spoken, path="translations")
    assert status == 400 and "translat" in json.loads(body)["error"]["message"]
    missing = server.http().post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"input": "x" * 4097}, "input", "4096"),
    ({"input": "   "}, "input", "empty"),
    ({"input": "hi", "speed": 5}, "speed", ""),
    ({"input": "hi", "voice": "darth"}, "voice", "alloy"),
    ({"input": "hi", "response_format": "ogg"}, "response_format", ""),
    ({"input": "hi", "instructions": "whisper it"}, "instructions", ""),
])
def test_bad_speech_requests(server: HearthServer, body: dict, param: str, text: str) -> None:
    response = server.http().post("/v1/audio/speech", json={"model": "tts-1", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"]


def test_localai_tts_route(server: HearthServer) -> None:
    response = server.http().post("/tts", json={"model": "en_US-joe-medium", "input": "Hello there."})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert duration_of(response.content) > 0.5


def test_speech_model_cannot_chat(server: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tts-1", messages=[{"role": "user", "content": "hi"}])


def test_piper_computes_with_the_models_threads(server: HearthServer) -> None:
    """In-process: Piper's onnxruntime session uses the model's `threads` (PiperVoice.load would take every core),
    and the voice built so speaks the same as the server's."""
    from hearth.backends.base import LoadSpec, SpeechSpec
    from hearth.backends.piper import Backend

    voice = Backend()
    voice.load(LoadSpec(model_name="joe", backend="piper", model_path=str(server.models_dir / "en_US-joe-medium.onnx"),
                        config={"noise_scale": 0, "noise_w": 0}, threads=1))
    assert voice.voice.session.get_session_options().intra_op_num_threads == 1
    audio = b"".join(voice.speak(SpeechSpec(text=SENTENCE, voice="alloy", speed=1.0, response_format="wav")))
    served = server.http().post("/v1/audio/speech", json={"model": "steady", "input": SENTENCE,
                                                          "response_format": "wav"}).content
    assert abs(duration_of(audio) - duration_of(served)) < 0.05
