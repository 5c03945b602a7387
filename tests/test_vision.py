"""Vision: images in chat reach a tiny random-weight LLaVA the test builds with transformers, and a tiny Idefics3
(SmolVLM's architecture) converted to GGUF plus mmproj by llama.cpp's own converter; image URLs are fetched safely
(no loopback, private or link-local destination unless allowed, redirects checked, size capped)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from hearth.backends.base import GenerationSpec, LoadSpec, Sampling
from hearth.backends.llama_cpp import Backend
from hearth.backends.llama_scheduler import Media, MediaImage
from tests import tiny_vlm_gguf
from tests.conftest import CACHE_DIR, HearthServer, free_port, write_yaml

pytestmark = pytest.mark.real_model

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>", "<|end|>",
         *["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z", "the", "is", "what", "this", "picture", "describe", "red", "blue"]]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}"
            "{% endfor %}{% endif %}<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
IMAGE_TOKENS = 4  # a 28x28 image in 14x14 patches
# The GGUF model sees a small image as one 64x64 slice plus the overview, each 4x4 patches merged 2x2: 4 tokens each.
GGUF_IMAGE_TOKENS = 8


def build_tiny_llava(folder: Path) -> None:
    """A LLaVA (CLIP vision tower + Llama) with random weights, saved as Hugging Face saves one."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {word: index for index, word in enumerate(dict.fromkeys(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>", "<|end|>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def png(colour: str = "red", size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Listener:
    """A local HTTP server that counts the requests it gets; serves a PNG, a redirect, a big file or text."""

    def __init__(self, host: str, redirect_to: str = "") -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                body = {"/cat.png": png("blue"), "/big.png": b"\x89PNG" + b"\0" * (3 * 1024 * 1024),
                        "/notes.txt": b"hello, I am not an image"}.get(self.path, b"")
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.port = free_port()
        self.server = ThreadingHTTPServer((host, self.port), Handler)
        self.base = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def victim() -> Iterator[Listener]:
    """Something on loopback that must never be reached through an image URL."""
    listener = Listener("127.0.0.1")
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def allowed(victim: Listener) -> Iterator[Listener]:
    """An image server on 127.0.0.2, which the server's allow-list names; it can redirect to the victim."""
    listener = Listener("127.0.0.2", redirect_to=f"{victim.base}/cat.png")
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("vision-models")
    build_tiny_llava(models / "tiny-llava")
    write_yaml(models, "tiny-llava", {"name": "tiny-llava", "backend": "transformers",
                                      "parameters": {"model": "tiny-llava"}})
    weights, projector = tiny_vlm_gguf.build(models, CACHE_DIR)
    write_yaml(models, "tiny-vlm", {"name": "tiny-vlm", "backend": "llama-cpp", "parameters": {"model": weights},
                                    "mmproj": projector, "context_size": 1024, "parallel": 2})
    write_yaml(models, "tiny-vlm-text", {"name": "tiny-vlm-text", "parameters": {"model": weights},
                                         "context_size": 1024, "parallel": 2})
    write_yaml(models, "fake-chat", {"name": "fake-chat", "backend": "fake"})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log",
                           env={"HEARTH_IMAGE_FETCH_ALLOW": "127.0.0.2", "HEARTH_IMAGE_MAX_BYTES": str(2 * 1024 * 1024)})
    yield started
    started.stop()


def ask(server: HearthServer, url: str, model: str = "tiny-llava", **extra: object):
    extra.setdefault("max_tokens", 6)
    return server.client().chat.completions.create(model=model, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "what is this picture"}]}], **extra)


def test_data_url_image_reaches_the_model(server: HearthServer) -> None:
    with_image = ask(server, data_url(png()))
    text_only = server.client().chat.completions.create(
        model="tiny-llava", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is this picture"}]}])
    # The image was encoded: its tokens are counted in the prompt.
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS
    assert with_image.usage.completion_tokens > 0


def test_openai_vision_names_reach_the_first_vision_model(server: HearthServer) -> None:
    """No config claims gpt-4-vision-preview or gpt-4o here, so they name the first installed vision model."""
    listed = {m.id: m for m in server.client().models.list()}
    assert listed["gpt-4-vision-preview"].model_extra["alias_of"] == "tiny-llava"
    assert listed["gpt-4o"].model_extra["alias_of"] == "tiny-llava"
    reply = ask(server, data_url(png()), model="gpt-4-vision-preview")
    assert reply.usage.prompt_tokens > IMAGE_TOKENS and reply.model == "gpt-4-vision-preview"


def test_two_images_and_streaming(server: HearthServer) -> None:
    stream = server.client().chat.completions.create(
        model="tiny-llava", max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png("red")), "detail": "low"}},
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": data_url(png("blue", (64, 64)))}}]}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert usage.prompt_tokens >= 2 * IMAGE_TOKENS
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_url_on_an_allowed_address_is_fetched(server: HearthServer, allowed: Listener) -> None:
    before = len(allowed.hits)
    reply = ask(server, f"{allowed.base}/cat.png")
    assert reply.usage.prompt_tokens > IMAGE_TOKENS
    assert allowed.hits[before:] == ["/cat.png"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "2130706433",
                                  "0.0.0.0", "[::ffff:127.0.0.1]"])
def test_private_destinations_are_refused_unfetched(server: HearthServer, victim: Listener, host: str) -> None:
    before = len(victim.hits)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, f"http://{host}:{victim.port}/cat.png")
    assert "image refused" in caught.value.message and "address" in caught.value.message
    assert caught.value.body["param"] == "messages[0].content[0].image_url.url"
    assert victim.hits[before:] == []


def test_redirect_to_loopback_is_refused(server: HearthServer, allowed: Listener, victim: Listener) -> None:
    before = len(victim.hits)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, f"{allowed.base}/redirect")
    assert "127.0.0.1" in caught.value.message and "loopback" in caught.value.message
    assert victim.hits[before:] == []


@pytest.mark.parametrize(("path", "words"), [("/big.png", "larger than the limit"), ("/notes.txt", "not an image"),
                                              ("/missing.png", "answered 404")])
def test_bad_fetched_images(server: HearthServer, allowed: Listener, path: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, f"{allowed.base}{path}")
    assert words in caught.value.message


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,not-base64!!", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not an image"),
    ("data:image/png;base64," + base64.b64encode(b"\0" * (3 * 1024 * 1024)).decode(), "larger than the limit"),
    ("ftp://example.com/cat.png", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
])
def test_bad_image_urls(server: HearthServer, url: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, url)
    assert words in caught.value.message


def test_model_without_vision_names_those_with_it(server: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, data_url(png()), model="fake-chat")
    assert "does not accept images" in caught.value.message and "tiny-llava" in caught.value.message


def test_fetching_can_be_turned_off(tmp_path: Path, allowed: Listener) -> None:
    build_tiny_llava(tmp_path / "tiny-llava")
    write_yaml(tmp_path, "tiny-llava", {"name": "tiny-llava", "backend": "transformers",
                                        "parameters": {"model": "tiny-llava"}})
    server = HearthServer(tmp_path, tmp_path / "log.txt", env={"HEARTH_IMAGE_FETCH": "false",
                                                                "HEARTH_IMAGE_FETCH_ALLOW": "127.0.0.2"})
    try:
        before = len(allowed.hits)
        with pytest.raises(openai.BadRequestError) as caught:
            ask(server, f"{allowed.base}/cat.png")
        assert "turned off" in caught.value.message and allowed.hits[before:] == []
        assert ask(server, data_url(png())).usage.prompt_tokens > IMAGE_TOKENS  # data: URLs still work
    finally:
        server.stop()


# -- llama.cpp: GGUF plus mmproj ---------------------------------------------------------------------------------


def first_token_logprob(server: HearthServer, url: str) -> float:
    reply = ask(server, url, model="tiny-vlm", logprobs=True, max_tokens=1)
    return reply.choices[0].logprobs.content[0].logprob


def test_gguf_image_reaches_the_model(server: HearthServer) -> None:
    with_image = ask(server, data_url(png()), model="tiny-vlm")
    text_only = server.client().chat.completions.create(
        model="tiny-vlm", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is this picture"}]}])
    # The image was encoded into its embedding positions, counted in the prompt (with the tokens around them).
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + GGUF_IMAGE_TOKENS
    assert with_image.usage.completion_tokens > 0
    # The picture changes what the model computes: another colour, another distribution.
    red = first_token_logprob(server, data_url(png("red")))
    assert first_token_logprob(server, data_url(png("red"))) == pytest.approx(red, abs=1e-4)
    assert first_token_logprob(server, data_url(png("blue"))) != pytest.approx(red, abs=1e-4)


def test_gguf_two_images_streamed_from_an_allowed_url(server: HearthServer, allowed: Listener) -> None:
    before = len(allowed.hits)
    stream = server.client().chat.completions.create(
        model="tiny-vlm", max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{allowed.base}/cat.png"}},
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": data_url(png("blue", (64, 64)))}}]}])
    chunks = list(stream)
    assert allowed.hits[before:] == ["/cat.png"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens >= 2 * GGUF_IMAGE_TOKENS
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_gguf_image_and_text_requests_run_together_without_leaking(server: HearthServer) -> None:
    """An image request and a text request share the model's context (two sequences): the text answer is the same
    as when it runs alone, and the image request's answer is the same as alone too."""
    client = server.client()

    def text() -> str:
        return client.chat.completions.create(model="tiny-vlm", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": "the quick brown fox"}]).choices[0].message.content

    def image() -> str:
        return ask(server, data_url(png("green")), model="tiny-vlm").choices[0].message.content

    alone = (text(), image())
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("text", text())),
               threading.Thread(target=lambda: results.__setitem__("image", image()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (results["text"], results["image"]) == alone


def test_gguf_vision_chat_that_goes_on_reuses_its_image(server: HearthServer) -> None:
    """The prompt cache knows images by their bytes: the next turn of a vision chat takes the first turn, image
    included, from the cache (neither encoded nor read again), and answers as if it had computed it all."""
    client = server.client()

    def chat(picture: bytes, *more: dict) -> Any:
        return client.chat.completions.create(model="tiny-vlm", max_tokens=4, temperature=0, logprobs=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                         {"type": "text", "text": "what is this picture"}]}, *more])

    purple, orange = png("purple", (36, 36)), png("orange", (36, 36))
    first = chat(purple)
    going_on = ({"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and what colour is it"})
    warm = chat(purple, *going_on)
    # At most the text before the picture (the template's system prompt) was cached for the first turn.
    before_the_picture = first.usage.prompt_tokens - GGUF_IMAGE_TOKENS
    assert first.usage.prompt_tokens_details.cached_tokens < before_the_picture
    assert warm.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    # Other requests take both slots (a request lands on the slot holding most of its prompt, so two at once are
    # needed to evict the chat), then the same conversation runs cold: the same answer, the same numbers.
    def interloper(text: str) -> None:
        client.chat.completions.create(model="tiny-vlm", max_tokens=400, extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": text}])

    others = [threading.Thread(target=interloper, args=(text,)) for text in ("hi", "hello there")]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join(60)
    cold = chat(purple, *going_on)
    assert cold.usage.prompt_tokens_details.cached_tokens < before_the_picture
    assert cold.choices[0].message.content == warm.choices[0].message.content
    assert [t.logprob for t in cold.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in warm.choices[0].logprobs.content], abs=1e-3)
    # The same words about another picture reuse nothing past the point where the pictures differ.
    other = chat(orange, *going_on)
    assert other.usage.prompt_tokens_details.cached_tokens < before_the_picture
    assert other.usage.prompt_tokens == warm.usage.prompt_tokens


@pytest.fixture(scope="module")
def vlm(server: HearthServer) -> Iterator[Backend]:
    """The tiny GGUF vision model loaded in this process: the llama.cpp backend called directly."""
    backend = Backend()
    backend.load(LoadSpec(model_name="tiny-vlm", backend="llama-cpp", model_path=str(server.models_dir / "tiny-vlm.gguf"),
                          config={}, threads=2, context_size=512, parallel=2,
                          files={"mmproj": str(server.models_dir / "mmproj-tiny-vlm.gguf")}))
    yield backend
    backend.close()


def vlm_spec(prompt: str, *images: bytes) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, prompt_tokens=None, images=list(images), max_tokens=3,
                          sampling=Sampling(temperature=0))


def test_gguf_images_are_known_by_their_bytes_and_place(vlm: Backend) -> None:
    red, blue = png("red", (36, 36)), png("blue", (36, 36))
    prompt = "User: <__media__> and <__media__> what are these<end_of_utterance>\nAssistant:"
    first, again, swapped = (vlm._media(vlm_spec(prompt, *pair)) for pair in ((red, blue), (red, blue), (blue, red)))
    try:
        assert first.tokens == again.tokens  # the same images in the same places: the same prompt
        assert len(first.tokens) == len(swapped.tokens)
        start = first.images[0].start
        assert first.tokens[:start] == swapped.tokens[:start]
        assert first.tokens[start] != swapped.tokens[start]  # another image: the prefix ends where it starts
        # No id an image stands as is a vocabulary token, and no two image chunks share one.
        ids = [first.tokens[image.start] for image in first.images]
        assert all(i < 0 for i in ids) and len(set(ids)) == len(ids) >= 2
        for image in first.images:
            assert set(first.tokens[image.start:image.end]) == {first.tokens[image.start]}
    finally:
        for media in (first, again, swapped):
            media.close()


def test_media_cuts_fall_on_image_boundaries_and_count_positions() -> None:
    media = Media()
    media.tokens = [5, 6, -9, -9, -9, -9, 7, -8, -8, 8]
    media.images = [MediaImage(start=2, chunk=None, n_tokens=4, n_pos=2), MediaImage(start=7, chunk=None, n_tokens=2,
                                                                                       n_pos=2)]
    assert [media.cut(i) for i in range(11)] == [0, 1, 2, 2, 2, 2, 6, 7, 7, 9, 10]
    # An M-RoPE image fits its 4 tokens in 2 positions: the text after it sits 2 positions earlier.
    assert [media.positions_before(i) for i in (0, 2, 6, 7, 9, 10)] == [0, 2, 4, 5, 7, 8]


def test_gguf_without_mmproj_refuses_images_and_names_the_vision_models(server: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, data_url(png()), model="tiny-vlm-text")
    assert "does not accept images" in caught.value.message
    assert caught.value.message.endswith("installed models that do: tiny-llava, tiny-vlm")


def test_gguf_projector_is_not_listed_as_a_model(server: HearthServer) -> None:
    # Ollama's clients see the capability (Open WebUI offers image upload on it).
    assert "vision" in server.http().post("/api/show", json={"model": "tiny-vlm"}).json()["capabilities"]
    assert "vision" not in server.http().post("/api/show", json={"model": "tiny-vlm-text"}).json()["capabilities"]
    names = {m.id for m in server.client().models.list()}
    assert {"tiny-vlm", "tiny-vlm-text"} <= names
    assert not any("mmproj" in name for name in names)


def test_bad_projectors_fail_with_reasons(tmp_path: Path, server: HearthServer) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(server.models_dir / "tiny-vlm.gguf", models / "tiny-vlm.gguf")
    (models / "notes.gguf").write_text("not a projector")
    write_yaml(models, "not-gguf", {"name": "not-gguf", "parameters": {"model": "tiny-vlm.gguf"},
                                    "mmproj": "notes.gguf", "context_size": 512, "parallel": 1})
    write_yaml(models, "missing", {"name": "missing", "parameters": {"model": "tiny-vlm.gguf"},
                                   "mmproj": "nowhere.gguf", "context_size": 512, "parallel": 1})
    write_yaml(models, "escapes", {"name": "escapes", "parameters": {"model": "tiny-vlm.gguf"},
                                   "mmproj": "../outside.gguf"})
    started = HearthServer(models, tmp_path / "log.txt")
    try:
        client = started.client()
        for name, words in (("not-gguf", "notes.gguf is not a GGUF file"), ("missing", "(mmproj) nowhere.gguf does "
                                                                                      "not exist")):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
            assert words in caught.value.message
        assert "escapes" not in {m.id for m in client.models.list()}
        assert "mmproj path '../outside.gguf' contains '..'" in (tmp_path / "log.txt").read_text()
    finally:
        started.stop()
