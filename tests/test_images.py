"""Image generation on a tiny random-weight Stable Diffusion pipeline the test builds with diffusers."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import HearthServer, write_yaml

pytestmark = pytest.mark.real_model

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")


def build_tiny_sd(folder: Path) -> None:
    """Stable Diffusion's parts (UNet, VAE, CLIP text encoder and tokenizer, DDIM) at toy sizes, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64)  # four blocks: SD's factor of 8 between pixels and latents
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    scratch = folder.with_name(folder.name + "-tokenizer")
    scratch.mkdir(parents=True)
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("image-models")
    build_tiny_sd(models / "tiny-sd")
    write_yaml(models, "tiny-sd", {"name": "tiny-sd", "backend": "diffusers", "parameters": {"model": "tiny-sd"},
                                   "step": 2, "alias": ["dall-e-2"]})
    write_yaml(models, "tiny-sd-sized", {"name": "tiny-sd-sized", "backend": "diffusers", "step": 2,
                                         "parameters": {"model": "tiny-sd"}, "sizes": ["64x64", "128x64"],
                                         "diffusers": {"scheduler_type": "euler_a"}})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log",
                           env={"HEARTH_CACHE_DIR": str(cache), "HEARTH_GENERATED_IMAGES_TTL_MINUTES": "10"})
    yield started
    started.stop()


def generate(server: HearthServer, **body: object) -> list[bytes]:
    response = server.http().post("/v1/images/generations", json={"model": "tiny-sd", "prompt": "a red cat",
                                                                   "response_format": "b64_json", **body})
    assert response.status_code == 200, response.text
    return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]


def test_b64_json_is_a_png_of_the_requested_size(server: HearthServer) -> None:
    (image,) = generate(server, size="96x64")
    assert png_size(image) == (96, 64)
    (default,) = generate(server)
    assert png_size(default) == (64, 64)  # the model's native size (UNet 8 x VAE factor 8)
    assert "step 2/2" in server.log()


def test_n_and_seed(server: HearthServer) -> None:
    two = generate(server, n=2, seed=7, size="64x64")
    assert len(two) == 2 and two[0] != two[1]
    assert generate(server, n=2, seed=7, size="64x64") == two
    assert generate(server, seed=8, size="64x64")[0] != two[0]


def test_official_client_and_url_results(server: HearthServer, cache: Path) -> None:
    client = server.client()
    result = client.images.generate(model="dall-e-2", prompt="a blue dog|blurry", size="64x64", n=1,
                                    extra_body={"steps": 2, "seed": 3})
    assert result.created > 0 and len(result.data) == 1
    url = result.data[0].url
    assert url.startswith(f"{server.base_url}/generated-images/") and url.endswith(".png")
    fetched = server.http().get(url.removeprefix(server.base_url))
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert png_size(fetched.content) == (64, 64)
    # Kept for generated_images_ttl_minutes, then gone: age the file past it.
    path = cache / "generated-images" / url.rsplit("/", 1)[1]
    old = time.time() - 11 * 60
    os.utime(path, (old, old))
    gone = server.http().get(url.removeprefix(server.base_url))
    assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"]
    assert not path.exists()
    assert server.http().get("/generated-images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    b64 = client.images.generate(model="tiny-sd", prompt="x", size="64x64", response_format="b64_json")
    assert png_size(base64.b64decode(b64.data[0].b64_json)) == (64, 64)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"size": "100x100"}, "size", "multiples of 8"),
    ({"size": "4096x4096"}, "size", "512x512"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "|only negative"}, "prompt", "empty"),
    ({"n": 11}, "n", ""),
    ({"response_format": "jpeg"}, "response_format", ""),
    ({"model": "tiny-sd-sized", "size": "64x128"}, "size", "64x64, 128x64"),
    ({"colour": "red"}, "colour", ""),
])
def test_bad_requests_are_400(server: HearthServer, body: dict, param: str, words: str) -> None:
    response = server.http().post("/v1/images/generations", json={"model": "tiny-sd", "prompt": "a cat", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_listed_sizes_and_scheduler(server: HearthServer) -> None:
    response = server.http().post("/v1/images/generations", json={
        "model": "tiny-sd-sized", "prompt": "a cat", "size": "128x64", "response_format": "b64_json"})
    assert response.status_code == 200
    assert png_size(base64.b64decode(response.json()["data"][0]["b64_json"])) == (128, 64)


def test_edits_and_variations(server: HearthServer) -> None:
    from PIL import Image

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    source = png(Image.new("RGB", (64, 64), "green"))
    masked = Image.new("RGBA", (64, 64), (0, 128, 0, 255))
    masked.paste((0, 0, 0, 0), (16, 16, 48, 48))  # the transparent square is what gets repainted
    client = server.client()
    img2img = client.images.edit(model="tiny-sd", image=("in.png", source), prompt="a red square", size="64x64",
                                 response_format="b64_json", extra_body={"steps": 4, "strength": 0.5})
    assert png_size(base64.b64decode(img2img.data[0].b64_json)) == (64, 64)
    inpaint = client.images.edit(model="tiny-sd", image=("in.png", png(masked)), prompt="a cat", size="64x64",
                                 response_format="b64_json", n=2)
    assert len(inpaint.data) == 2
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="tiny-sd", image=("in.png", b"not an image"), prompt="x")
    assert caught.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.create_variation(model="tiny-sd", image=("in.png", source))
    assert "variations" in caught.value.message


def test_stablediffusion_not_installed_says_how(server: HearthServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().images.generate(model="stablediffusion", prompt="a cat")
    assert "hearth run --aio" in caught.value.message and "hearth models install stablediffusion" in caught.value.message


def test_steps_follow_the_board_of_busy_runners(tmp_path: Path) -> None:
    """In-process: while the server's board shows another runner working, each step computes with a share of the
    cores (torch's threads, set in the thread that runs the pipeline), and with all of them again once alone."""
    import torch

    from hearth.backends.base import LoadSpec
    from hearth.backends.diffusers_backend import Backend, GeneratedImage, ImageSpec
    from hearth.cores import Board

    build_tiny_sd(tmp_path / "tiny-sd")
    board = Board(tmp_path / "cores", create=True)
    backend = Backend()
    before = torch.get_num_threads()
    try:
        backend.load(LoadSpec(model_name="tiny-sd", backend="diffusers", model_path=str(tmp_path / "tiny-sd"),
                              config={"step": 2}, threads=2, board=board))
        backend.share.cores = 2  # as on this machine kind, whatever the machine running the tests

        def image() -> bytes:
            spec = ImageSpec(prompt="a red cat", width=64, height=64, steps=2, seed=7)
            return next(i.png for i in backend.generate_image(spec) if isinstance(i, GeneratedImage))

        alone = image()
        assert backend.threads == 2
        board.mark(0, True)
        board.mark(1, True)
        shared = image()
        assert backend.threads == 1
        board.mark(1, False)
        again = image()
        assert backend.threads == 2
    finally:
        backend.close()
        board.close()
        torch.set_num_threads(before)
    # The same seed gives the same image with the same threads; on one thread torch splits its sums differently, so
    # a few pixels may round the other way.
    assert again == alone and png_size(shared) == (64, 64)
