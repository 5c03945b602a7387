"""Voice activity detection (LocalAI's silero-vad backend and /v1/vad) on the real Silero VAD v6 weights, which ship
in the faster-whisper wheel, and on a small ONNX file in Silero's own export's shape (the one LocalAI's gallery
names), which the test builds."""

from __future__ import annotations

import io
import json
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hearth.gallery.builtin import install
from tests.conftest import CACHE_DIR, HearthServer, write_yaml

pytestmark = pytest.mark.real_model


def official_shaped_vad(path: Path) -> None:
    """An ONNX model with Silero's own inputs and outputs (input [1, 576], state [2, 1, 128], sr) whose "speech
    probability" is the window's loudness through a sigmoid: loud is speech. The state passes through."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "input"], ["squared"]),
         helper.make_node("ReduceMean", ["squared"], ["power"], keepdims=0),
         helper.make_node("Sub", ["power", "floor"], ["above"]),
         helper.make_node("Mul", ["above", "gain"], ["scaled"]),
         helper.make_node("Sigmoid", ["scaled"], ["probability"]),
         helper.make_node("Reshape", ["probability", "shape"], ["output"]),
         helper.make_node("Identity", ["state"], ["stateN"])],
        "loudness-vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 576]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 128]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 128])],
        [helper.make_tensor("floor", TensorProto.FLOAT, [], [0.01]),
         helper.make_tensor("gain", TensorProto.FLOAT, [], [1000.0]),
         helper.make_tensor("shape", TensorProto.INT64, [2], [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def wav(samples: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.float32) / 32768, \
            reader.getframerate()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("vad-models")
    for name in ("silero-vad", "en_US-joe-medium"):
        install(name, models, CACHE_DIR)
    write_yaml(models, "steady", {"name": "steady", "backend": "piper", "noise_scale": 0, "noise_w": 0,
                                  "parameters": {"model": "en_US-joe-medium.onnx"}})
    official_shaped_vad(models / "loudness.onnx")
    write_yaml(models, "loudness", {"name": "loudness", "backend": "silero-vad", "parameters": {"model": "loudness.onnx"}})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def conversation(server: HearthServer) -> np.ndarray:
    """"Hello there." then 1.5 s of silence then "How are you today?", at 16 kHz."""
    pieces = []
    for text in ("Hello there.", "How are you today?"):
        response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": text,
                                                                "response_format": "wav"})
        samples, rate = read_wav(response.content)
        pieces.append(np.interp(np.arange(0, len(samples), rate / 16_000), np.arange(len(samples)), samples))
    return np.concatenate([np.zeros(8000), pieces[0], np.zeros(24_000), pieces[1], np.zeros(8000)]).astype(np.float32)


def test_silero_finds_the_two_sentences(server: HearthServer, conversation: np.ndarray) -> None:
    response = server.http().post("/v1/vad", json={"model": "silero-vad", "audio": conversation.tolist()})
    assert response.status_code == 200, response.text
    reply = response.json()
    segments = reply["segments"]
    assert len(segments) == 2, segments
    assert reply["duration"] == pytest.approx(len(conversation) / 16_000, abs=0.01)
    first_end = 0.5 + 1.0  # the first sentence starts at 0.5 s and lasts about a second
    assert 0.3 < segments[0]["start"] < 0.7 and segments[0]["end"] < segments[1]["start"]
    assert segments[1]["start"] > first_end and segments[1]["end"] <= reply["duration"]
    gap = segments[1]["start"] - segments[0]["end"]
    assert 1.0 < gap < 1.9, segments
    # The same audio as a file (any format PyAV reads), and a setting of the request's own.
    upload = server.http().post("/v1/vad", data={"model": "silero-vad"},
                                files={"file": ("talk.wav", wav(conversation), "audio/wav")})
    assert upload.status_code == 200
    assert [round(s["start"], 1) for s in upload.json()["segments"]] == [round(s["start"], 1) for s in segments]
    merged = server.http().post("/vad", json={"model": "silero-vad", "audio": conversation.tolist(),
                                              "min_silence_ms": 3000})
    assert len(merged.json()["segments"]) == 1, "a pause shorter than min_silence_ms does not end speech"


def test_silero_finds_a_sentence_within_100_ms(server: HearthServer) -> None:
    """A Piper sentence padded with silence: the segment lies within 100 ms of where the speech is (its first and last
    10 ms windows above -60 dBFS: the padding is digital silence, and a final fricative fades through -40 dBFS)."""
    response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": "What is the capital of France?",
                                                            "response_format": "wav"})
    samples, rate = read_wav(response.content)
    speech = np.interp(np.arange(0, len(samples), rate / 16_000), np.arange(len(samples)), samples)
    audio = np.concatenate([np.zeros(20_000), speech, np.zeros(24_000)]).astype(np.float32)
    windows = np.sqrt((audio[:len(audio) // 160 * 160].reshape(-1, 160) ** 2).mean(axis=1))
    loud = np.flatnonzero(windows > 0.001)
    start, end = loud[0] * 0.01, (loud[-1] + 1) * 0.01
    (segment,) = server.http().post("/v1/vad", json={"model": "silero-vad", "audio": audio.tolist()}).json()["segments"]
    assert abs(segment["start"] - start) <= 0.1 and abs(segment["end"] - end) <= 0.1, (segment, start, end)


def test_silero_exports_shape(server: HearthServer) -> None:
    """Silero's own export (input/state/sr), as LocalAI's gallery entry names it, read the same way."""
    rng = np.random.default_rng(0)
    audio = np.concatenate([np.zeros(16_000), rng.normal(0, 0.3, 16_000), np.zeros(16_000)]).astype(np.float32)
    reply = server.http().post("/v1/vad", json={"model": "loudness", "audio": audio.tolist()}).json()
    (segment,) = reply["segments"]
    assert segment["start"] == pytest.approx(1.0, abs=0.1) and segment["end"] == pytest.approx(2.0, abs=0.15)
    runners = {r["name"]: r for r in server.runners()}
    assert runners["loudness"]["backend"] == "silero-vad"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "silero-vad"}, 400, "audio"),
    ({"model": "silero-vad", "audio": []}, 400, "audio"),
    ({"model": "silero-vad", "audio": [0.1], "threshold": 2}, 400, "threshold"),
    ({"model": "silero-vad", "audio": [0.1], "extra": 1}, 400, "extra"),
    ({"model": "nope", "audio": [0.1]}, 404, "model"),
    ({"model": "steady", "audio": [0.1]}, 400, "model"),
])
def test_bad_vad_requests(server: HearthServer, body: dict, status: int, param: str) -> None:
    response = server.http().post("/v1/vad", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_samples_that_are_not_numbers(server: HearthServer) -> None:
    response = server.http().post("/v1/vad", content=b'{"model": "silero-vad", "audio": [0.1, NaN]}',
                                  headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "audio"
    for body in (b"{not json", b"[1, 2]", b'{"model": "silero-vad", "audio": "loud"}'):
        broken = server.http().post("/v1/vad", content=body, headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["message"], body
    garbage = server.http().post("/v1/vad", data={"model": "silero-vad"},
                                 files={"file": ("x.wav", b"not audio at all", "audio/wav")})
    assert garbage.status_code == 400 and json.loads(garbage.content)["error"]["param"] == "file"
