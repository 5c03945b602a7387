"""stable-diffusion.cpp (LocalAI's stablediffusion-ggml) on a full-size SD 1.5 GGUF with random weights: images
through the HTTP API, a VAE given apart, LocalAI's `options` for its parts, sampler and scheduler, and parts that
must stay inside the models directory."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth.gallery.pypi import place
from tests.conftest import CACHE_DIR, HearthServer, write_yaml
from tests.sd15_gguf import build

pytestmark = pytest.mark.real_model
CHECKPOINT = "stable-diffusion-v1-5-pruned-emaonly-Q4_0.gguf"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    gguf, other_vae = build(CACHE_DIR)
    models = tmp_path_factory.mktemp("sdcpp-models")
    place(gguf, models / CHECKPOINT)
    place(other_vae, models / "parts" / "other-vae.safetensors")
    base = {"backend": "stablediffusion-ggml", "parameters": {"model": CHECKPOINT}, "step": 1}
    write_yaml(models, "sd15", {"name": "sd15", **base, "options": ["sampler:euler_a", "scheduler:discrete"]})
    write_yaml(models, "sd15-own-vae", {"name": "sd15-own-vae", **base,
                                        "options": ["sampler:euler", "vae_path:parts/other-vae.safetensors"]})
    write_yaml(models, "flux-shaped", {
        "name": "flux-shaped", "backend": "stablediffusion-ggml", "parameters": {"model": "parts/other-vae.safetensors"},
        "options": ["diffusion_model", "clip_l_path:parts/other-vae.safetensors",
                    "t5xxl_path:parts/other-vae.safetensors", "vae_path:parts/other-vae.safetensors", "sampler:euler"]})
    write_yaml(models, "part-outside", {**base, "name": "part-outside", "options": ["vae_path:../../etc/passwd"]})
    write_yaml(models, "bad-shift", {**base, "name": "bad-shift", "options": ["flow_shift:sideways"]})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield started
    started.stop()


def draw(server: HearthServer, model: str, seed: int = 7) -> bytes:
    response = server.http().post("/v1/images/generations", json={"model": model, "prompt": "a red square",
                                                                  "size": "64x64", "seed": seed,
                                                                  "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return png


def test_checkpoint_draws_and_repeats_with_a_seed(server: HearthServer) -> None:
    first, again = draw(server, "sd15"), draw(server, "sd15")
    assert hashlib.sha256(first).digest() == hashlib.sha256(again).digest()
    assert draw(server, "sd15", seed=8) != first
    assert "sampling using Euler A method" in server.log()


def test_a_vae_given_apart_is_the_one_used(server: HearthServer) -> None:
    """LocalAI's `vae_path` option: the same weights and seed decode to another picture through another VAE."""
    assert draw(server, "sd15-own-vae") != draw(server, "sd15")
    assert "loading vae from" in server.log() and "other-vae.safetensors" in server.log()


def test_a_diffusion_model_with_its_parts(server: HearthServer) -> None:
    """LocalAI's split form (Flux, SD3, Wan: `diffusion_model` with clip, t5 and vae parts): each part is handed to
    stable-diffusion.cpp, which reads it; no model of those families is small enough to run here, so this one is
    made of parts stable-diffusion.cpp cannot recognise, and its load fails with stable-diffusion.cpp's reason."""
    response = server.http().post("/v1/images/generations", json={"model": "flux-shaped", "prompt": "x",
                                                                  "size": "64x64"})
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "model_load_failed"
    assert "get sd version from file failed" in error["message"]
    log = server.log()
    for part in ("loading diffusion model from", "loading clip_l from", "loading t5xxl from", "loading vae from"):
        assert part in log, part


def test_parts_stay_inside_the_models_directory(server: HearthServer) -> None:
    response = server.http().post("/v1/images/generations", json={"model": "part-outside", "prompt": "x"})
    assert response.status_code == 404
    assert "options vae_path" in response.json()["error"]["message"]
    assert "outside the models directory" in response.json()["error"]["message"] or \
        "'..'" in response.json()["error"]["message"]


def test_an_option_that_is_not_a_number_says_so(server: HearthServer) -> None:
    response = server.http().post("/v1/images/generations", json={"model": "bad-shift", "prompt": "x"})
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and "flow_shift: 'sideways' is not a number" in error["message"]


def test_the_checkpoint_is_the_real_format(server: HearthServer) -> None:
    with (Path(server.models_dir) / CHECKPOINT).open("rb") as checkpoint:
        assert checkpoint.read(4) == b"GGUF"
