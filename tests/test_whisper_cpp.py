"""whisper.cpp (LocalAI's `whisper` backend) on real Whisper weights in ggml format: every response format, streaming,
translation, and LocalAI's own gallery entry installed from a stand-in hub."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hearth.gallery.builtin import install
from tests.conftest import CACHE_DIR, HearthServer, write_yaml
from tests.standin import StandIn
from tests.whisper_ggml import build

pytestmark = pytest.mark.real_model

SENTENCE = "The quick brown fox jumps over the lazy dog."
PINNED = Path(__file__).parent / "data" / "localai-gallery" / "gallery"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """GitHub with LocalAI's whisper-base base config, and the hub with ggml-base.bin where LocalAI's entry has it
    (the test's own file, so its own checksum)."""
    standin = StandIn()
    standin.files["/mudler/LocalAI/master/gallery/whisper-base.yaml"] = (PINNED / "whisper-base.yaml").read_bytes()
    ggml_base = build("whisper-base", tmp_path_factory.mktemp("hub"), CACHE_DIR, "ggml-base.bin").read_bytes()
    standin.files["/ggerganov/whisper.cpp/resolve/main/ggml-base.bin"] = ggml_base
    entry = next(e for e in yaml.safe_load(gzip.decompress((PINNED / "index.yaml.gz").read_bytes()))
                 if e["name"] == "whisper-base")
    entry["files"][0]["sha256"] = hashlib.sha256(ggml_base).hexdigest()  # LocalAI's real file has its own
    standin.files["/ours/whisper/main/index.yaml"] = yaml.safe_dump([entry]).encode()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hub: StandIn) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("whisper-cpp-models")
    build("whisper-tiny.en", models, CACHE_DIR, "ggml-tiny.en.bin")
    write_yaml(models, "tiny-cpp", {"name": "tiny-cpp", "backend": "whisper",  # LocalAI's name for whisper.cpp
                                    "parameters": {"model": "ggml-tiny.en.bin"}})
    for name in ("whisper-tiny.en", "en_US-joe-medium"):
        install(name, models, CACHE_DIR)
    write_yaml(models, "tiny-ct2", {"name": "tiny-ct2", "backend": "whisper",
                                    "parameters": {"model": "whisper-tiny.en"}})
    write_yaml(models, "steady", {"name": "steady", "backend": "piper", "noise_scale": 0, "noise_w": 0,
                                  "parameters": {"model": "en_US-joe-medium.onnx"}})
    (models / "not-ggml.bin").write_bytes(b"GGUF" + b"\0" * 100)
    write_yaml(models, "wrong-file", {"name": "wrong-file", "backend": "whisper",
                                      "parameters": {"model": "not-ggml.bin"}})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": "github:ours/whisper/index.yaml@main", "HEARTH_GITHUB_RAW_URL": hub.base,
        "HF_ENDPOINT": hub.base, "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield started
    started.stop()


@pytest.fixture(scope="module")
def spoken(server: HearthServer) -> bytes:
    response = server.http().post("/v1/audio/speech", json={"model": "steady", "input": SENTENCE,
                                                            "response_format": "wav"})
    assert response.status_code == 200
    return response.content


def transcribe(server: HearthServer, audio: bytes, model: str = "tiny-cpp", path: str = "transcriptions",
               **fields: str) -> tuple[int, bytes]:
    response = server.http().post(f"/v1/audio/{path}", files={"file": ("speech.wav", audio, "audio/wav")},
                                  data={"model": model, **fields})
    return response.status_code, response.content


def test_backend_whisper_is_whisper_cpp_for_ggml_files(server: HearthServer, spoken: bytes) -> None:
    status, body = transcribe(server, spoken)
    assert status == 200, body
    assert words(json.loads(body)["text"]) == words(SENTENCE)
    backends = {r["name"]: r["backend"] for r in server.runners()}
    assert backends["tiny-cpp"] == "whisper-cpp"
    status, body = transcribe(server, spoken, model="tiny-ct2")  # a CTranslate2 folder stays with faster-whisper
    assert status == 200 and words(json.loads(body)["text"]) == words(SENTENCE)
    assert {r["name"]: r["backend"] for r in server.runners()}["tiny-ct2"] == "faster-whisper"


def test_every_response_format(server: HearthServer, spoken: bytes) -> None:
    status, body = transcribe(server, spoken, response_format="text")
    assert status == 200 and words(body.decode()) == words(SENTENCE)
    status, body = transcribe(server, spoken, response_format="srt")
    first = body.decode().strip().split("\n\n")[0].splitlines()
    assert first[0] == "1" and re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", first[1])
    status, body = transcribe(server, spoken, response_format="vtt")
    assert body.decode().startswith("WEBVTT\n\n") and words(body.decode().split("\n", 3)[-1]) == words(SENTENCE)
    status, body = transcribe(server, spoken, response_format="verbose_json", **{"timestamp_granularities[]": "word"})
    verbose = json.loads(body)
    assert verbose["language"] == "english" and verbose["task"] == "transcribe"
    assert 2.0 < verbose["duration"] < 4.0
    assert [w["word"].lower().strip(".,") for w in verbose["words"]] == words(SENTENCE)
    starts = [w["start"] for w in verbose["words"]]
    assert starts == sorted(starts) and verbose["words"][-1]["end"] <= verbose["duration"]
    segment = verbose["segments"][0]
    assert segment["id"] == 0 and segment["end"] <= verbose["duration"] and segment["avg_logprob"] < 0
    assert segment["tokens"] and all(isinstance(t, int) for t in segment["tokens"])


def test_streamed_transcription(server: HearthServer, spoken: bytes) -> None:
    events = []
    with server.http().stream("POST", "/v1/audio/transcriptions", files={"file": ("a.wav", spoken, "audio/wav")},
                              data={"model": "tiny-cpp", "stream": "true"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "transcript.text.done"
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    assert words(events[-1]["text"]) == words(SENTENCE)


def test_english_only_model_refuses_what_it_cannot(server: HearthServer, spoken: bytes) -> None:
    status, body = transcribe(server, spoken, path="translations")
    assert status == 400 and "does not support translate" in json.loads(body)["error"]["message"]
    status, body = transcribe(server, spoken, language="de")
    assert status == 400 and json.loads(body)["error"]["param"] == "language"
    status, body = transcribe(server, b"definitely not audio")
    assert status == 400 and json.loads(body)["error"]["param"] == "file"


def test_a_file_that_is_not_ggml_fails_to_load_with_the_reason(server: HearthServer, spoken: bytes) -> None:
    status, body = transcribe(server, spoken, model="wrong-file")
    error = json.loads(body)["error"]
    assert status == 500 and error["code"] == "model_load_failed"
    assert "GGUF file" in error["message"] and "faster-whisper" in error["message"]


def test_localai_whisper_entry_installs_and_translates(server: HearthServer, spoken: bytes, hub: StandIn) -> None:
    """LocalAI's whisper-base entry as it stands in LocalAI's gallery (its base config, the hub URI), installed and
    used for a translation: whisper-base is multilingual."""
    status = server.install(id="whisper-base")
    assert status["state"] == "done", status
    assert hub.hits["/ggerganov/whisper.cpp/resolve/main/ggml-base.bin"] == 1
    config = yaml.safe_load((server.models_dir / "whisper-base.yaml").read_text())
    assert config["backend"] == "whisper" and config["parameters"]["model"] == "ggml-base.bin"
    client = server.client()
    translated = client.audio.translations.create(model="whisper-base", file=("speech.wav", spoken))
    assert len(set(words(translated.text)) & set(words(SENTENCE))) >= 6
    heard = client.audio.transcriptions.create(model="whisper-base", file=("speech.wav", spoken), language="en")
    assert words(heard.text) == words(SENTENCE)
