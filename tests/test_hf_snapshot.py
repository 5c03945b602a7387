"""`parameters.model` naming a Hugging Face repository (diffusers, sentence-transformers; LocalAI's `artifacts:`):
the snapshot is downloaded from a stand-in hub, every file checked against the hub's listing, resumed when a
connection breaks, and nothing left behind when a file is wrong."""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from hearth.gallery.builtin import BUILTIN
from hearth.gallery.hfhub import HubFile, choose
from hearth.gallery.pypi import fetch_to_cache
from tests.conftest import CACHE_DIR, HearthServer
from tests.standin import StandIn
from tests.test_images import build_tiny_sd

PINNED = Path(__file__).parent / "data" / "localai-gallery" / "gallery"


def test_only_what_a_cpu_runner_loads_is_chosen() -> None:
    """A listing shaped like runwayml/stable-diffusion-v1-5's: the pipeline's safetensors, not the same weights
    again as .bin, fp16, non-EMA, Flax, ONNX or the single-file checkpoints at the top."""
    paths = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", ".gitattributes", "README.md",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
             "unet/diffusion_pytorch_model.msgpack", "text_encoder/model.safetensors",
             "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack", "tokenizer/vocab.json",
             "vae/diffusion_pytorch_model.safetensors", "onnx/unet/model.onnx", "feature_extractor/preprocessor_config.json",
             "safety_checker/pytorch_model.fp16.bin"]
    files = [HubFile(path=p, size=1, sha256=None, git_oid="0") for p in paths]
    chosen = sorted(f.path for f in choose(files))
    assert chosen == ["README.md", "feature_extractor/preprocessor_config.json", "model_index.json",
                      "safety_checker/pytorch_model.fp16.bin", "text_encoder/model.safetensors",
                      "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                      "vae/diffusion_pytorch_model.safetensors"]
    assert [f.path for f in choose(files, allow=["unet/*"], ignore=["*.json"])] == [
        "unet/diffusion_pytorch_model.safetensors"]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    standin = StandIn()
    for name in ("virtual.yaml", "sentencetransformers.yaml"):
        standin.files[f"/mudler/LocalAI/master/gallery/{name}"] = (PINNED / name).read_bytes()
    tiny = tmp_path_factory.mktemp("sd") / "tiny-sd"
    build_tiny_sd(tiny)
    sd_files = folder_files(tiny)
    standin.hub_repo("hearth-test/tiny-sd", sd_files, lfs_over=10_000)
    broken = dict(sd_files)
    standin.hub_repo("hearth-test/tampered-sd", broken, commit="ba" * 20, lfs_over=10_000)
    weights = "unet/diffusion_pytorch_model.safetensors"
    standin.files[f"/hearth-test/tampered-sd/resolve/{'ba' * 20}/{weights}"] = b"X" + broken[weights][1:]
    minilm = {spec.filename: fetch_to_cache(spec, CACHE_DIR).read_bytes() for spec in BUILTIN["all-minilm-l6-v2"].files
              if not spec.filename.startswith("onnx/")}
    commit = standin.hub_repo("sentence-transformers/all-MiniLM-L6-v2", minilm, commit="5e" * 20, lfs_over=1_000_000)
    standin.flaky.add(f"/sentence-transformers/all-MiniLM-L6-v2/resolve/{commit}/model.safetensors")
    entries = [
        {"name": "tiny-sd-hub", "url": "github:mudler/LocalAI/gallery/virtual.yaml@master", "overrides": {
            "backend": "diffusers", "known_usecases": ["image"], "parameters": {"model": "hearth-test/tiny-sd"},
            "step": 2, "artifacts": [{"name": "model", "target": "model", "source": {
                "type": "huggingface", "repo": "hearth-test/tiny-sd"}}]}},
        {"name": "tampered-sd", "url": "github:mudler/LocalAI/gallery/virtual.yaml@master", "overrides": {
            "backend": "diffusers", "parameters": {"model": "hearth-test/tampered-sd"}}},
        # LocalAI's own entry, as it stands in its gallery: a bare sentence-transformers model name.
        next(e for e in yaml.safe_load(gzip.decompress((PINNED / "index.yaml.gz").read_bytes()))
             if e["name"] == "all-MiniLM-L6-v2"),
    ]
    standin.files["/ours/hub/main/index.yaml"] = yaml.safe_dump(entries).encode()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hub: StandIn) -> Iterator[HearthServer]:
    started = HearthServer(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": "github:ours/hub/index.yaml@main", "HEARTH_GITHUB_RAW_URL": hub.base,
        "HF_ENDPOINT": hub.base, "HF_TOKEN": "hf_test", "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield started
    started.stop()




def test_diffusers_repo_snapshot_installs_and_draws(server: HearthServer, hub: StandIn) -> None:
    status = server.install(id="tiny-sd-hub")
    assert status["state"] == "done", status
    assert any("hearth-test/tiny-sd at commit" in note for note in status["notes"])
    assert status["downloaded_bytes"] == status["total_bytes"] > 0
    folder = server.models_dir / "huggingface" / "hearth-test" / "tiny-sd"
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    config = yaml.safe_load((server.models_dir / "tiny-sd-hub.yaml").read_text())
    assert config["parameters"]["model"] == "huggingface/hearth-test/tiny-sd" and "artifacts" not in config
    assert all(headers.get("Authorization") == "Bearer hf_test" for path, headers in hub.headers
               if path.startswith(("/api/models/hearth-test", "/hearth-test/")))
    image = server.http().post("/v1/images/generations", json={"model": "tiny-sd-hub", "prompt": "a red square",
                                                               "size": "64x64", "response_format": "b64_json"})
    assert image.status_code == 200, image.text
    assert base64.b64decode(image.json()["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    removed = server.http().post("/models/delete/tiny-sd-hub").json()["removed"]
    assert "huggingface/hearth-test/tiny-sd/model_index.json" in removed
    assert not (server.models_dir / "huggingface").exists(), "removing the model removes its snapshot"


def test_a_file_that_does_not_match_the_hub_fails_and_leaves_nothing(server: HearthServer) -> None:
    before = sorted(str(p) for p in server.models_dir.rglob("*"))
    status = server.install(id="tampered-sd")
    assert status["state"] == "failed" and "checksum mismatch for diffusion_pytorch_model.safetensors" in status["error"]
    assert sorted(str(p) for p in server.models_dir.rglob("*")) == before


def test_localai_sentence_transformers_entry_resumes_and_embeds(server: HearthServer, hub: StandIn) -> None:
    status = server.install(id="all-MiniLM-L6-v2")
    assert status["state"] == "done", status
    ranges = [h.get("Range") for path, h in hub.headers
              if path.startswith("/sentence-transformers/") and path.endswith("/model.safetensors")]
    assert ranges[0] is None and ranges[1] and ranges[1].startswith("bytes="), "the broken download resumed"
    folder = server.models_dir / "huggingface" / "sentence-transformers" / "all-MiniLM-L6-v2"
    expected = {spec.filename: spec.sha256 for spec in BUILTIN["all-minilm-l6-v2"].files}
    for name in ("model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == expected[name]
    reply = server.client().embeddings.create(model="all-MiniLM-L6-v2", input=[
        "A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."])
    vectors = [np.array(d.embedding) for d in reply.data]
    similar = float(vectors[0] @ vectors[1] / np.linalg.norm(vectors[0]) / np.linalg.norm(vectors[1]))
    assert similar == pytest.approx(0.755, abs=0.02)
