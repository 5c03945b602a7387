"""The web page at /, driven in headless Chromium (Debian's chromium package, through Playwright) against a real
server with real models: chat on SmolLM2, speech with whisper tiny.en and Piper, images on a tiny random-weight
Stable Diffusion pipeline, reranking on all-MiniLM-L6-v2. Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from hearth.gallery.builtin import install
from hearth.realtime.session import wav
from tests.conftest import ARTIFACTS, CACHE_DIR, HearthServer, install_cached, write_yaml
from tests.standin import StandIn
from tests.test_gallery import SHA, file_server
from tests.test_images import build_tiny_sd
from tests.test_vision import build_tiny_llava, png

pytestmark = pytest.mark.real_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes say: no sandbox as root, and no background connections to Google on a closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream"]
SHOTS = ARTIFACTS / "web"
SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def browser(server: HearthServer) -> Iterator[Browser]:
    """Chromium, started after the server: Playwright's sync API keeps an event loop running in this thread, and
    installing the test models runs one of its own."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def files() -> Iterator[StandIn]:
    served = file_server()
    yield served
    served.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path, files: StandIn) -> Iterator[HearthServer]:
    gallery = tmp_path_factory.mktemp("gallery") / "gallery.yaml"
    gallery.write_text(yaml.safe_dump([
        {"name": "web-fake", "description": "a fake model served by the test", "tags": ["test"],
         "config": {"backend": "fake"}, "files": [{"filename": "web-fake.bin", "uri": f"{files.base}/model.bin",
                                                   "sha256": SHA}]},
        {"name": "web-bad-sum", "description": "a download whose checksum is wrong", "config": {"backend": "fake"},
         "files": [{"filename": "web-bad-sum.bin", "uri": f"{files.base}/model.bin", "sha256": "0" * 64}]},
        {"name": "web-elsewhere", "description": "a model for a backend Hearth lacks",
         "overrides": {"backend": "crispasr", "parameters": {"model": "x.bin"}},
         "files": [{"filename": "x.bin", "uri": f"{files.base}/model.bin", "sha256": SHA}]}]))
    models = tmp_path_factory.mktemp("web-models")
    install_cached(models, smollm2_file, "smollm2.gguf")
    write_yaml(models, "smollm2", {"name": "smollm2", "parameters": {"model": "smollm2.gguf"}, "context_size": 2048,
                                   "parallel": 1})
    for name in ("whisper-tiny.en", "en_US-joe-medium", "all-minilm-l6-v2", "silero-vad"):
        install(name, models, CACHE_DIR)
    # The voice tab's answers are short and greedy: a rambling one (spoken in full before response.done) once ran
    # past the test's minute.
    write_yaml(models, "smollm2-brief", {"name": "smollm2-brief", "parameters": {"model": "smollm2.gguf",
                                                                               "max_tokens": 40, "temperature": 0},
                                         "context_size": 2048, "parallel": 1})
    write_yaml(models, "talk", {"name": "talk", "pipeline": {"vad": "silero-vad", "transcription": "whisper-tiny.en",
                                                             "llm": "smollm2-brief", "tts": "en_US-joe-medium"}})
    build_tiny_sd(models / "tiny-sd")
    write_yaml(models, "tiny-sd", {"name": "tiny-sd", "backend": "diffusers", "parameters": {"model": "tiny-sd"},
                                   "step": 2})
    write_yaml(models, "fake-chat", {"name": "fake-chat", "backend": "fake"})
    qwen3 = (Path(__file__).parent / "data" / "llama-chat" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    write_yaml(models, "fake-thinker", {"name": "fake-thinker", "backend": "fake", "fake": {
        "chat_template": qwen3, "reply": "<think>\nThe user says hello.\n</think>\n\nHello **there**!"}})
    write_yaml(models, "fake-short", {"name": "fake-short", "backend": "fake", "context_size": 200})
    build_tiny_llava(models / "tiny-llava")
    write_yaml(models, "tiny-llava", {"name": "tiny-llava", "backend": "transformers",
                                      "parameters": {"model": "tiny-llava"}})
    write_yaml(models, "broken", {"name": "broken", "backend": "fake", "fake": {"fail_load": "weights are corrupt"}})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": str(gallery), "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield started
    started.stop()


@pytest.fixture
def page(browser: Browser, server: HearthServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(server.base_url + "/")
    expect(opened.locator("#chat-model option")).not_to_have_count(0)
    yield opened
    context.close()
    assert errors == [], f"the page threw: {errors}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_chat_streams_an_answer_from_smollm2(page: Page) -> None:
    page.select_option("#chat-model", "smollm2")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-input", "Write one sentence about the sea.")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").last
    # Text appears while the answer is still streaming (Stop is enabled until it ends).
    expect(answer.locator(".md")).not_to_be_empty(timeout=60_000)
    expect(answer.locator(".meta")).to_contain_text("tokens/s", timeout=60_000)
    expect(page.locator("#chat-stop")).to_be_disabled()
    assert len(answer.locator(".md").inner_text().split()) >= 3
    assert "/v1/chat/completions" in page.locator(".snippet[data-for=chat]").inner_text()
    assert "client.chat.completions.create" in page.locator(".snippet[data-for=chat]").inner_text()
    shot(page, "chat")
    # The conversation survives a reload (local storage).
    page.reload()
    expect(page.locator(".msg.assistant .md").last).to_have_text(answer.locator(".md").inner_text())


def test_a_thinking_models_thoughts_fold_away_above_its_answer(page: Page) -> None:
    page.select_option("#chat-model", "fake-thinker")
    page.fill("#chat-temperature", "0")  # the fake backend's fixed reply is its greedy one
    page.fill("#chat-input", "hello")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".meta")).to_contain_text("tokens", timeout=30_000)
    expect(answer.locator(".md")).to_have_text("Hello there!")
    expect(answer.locator(".thoughts")).to_be_visible()
    expect(answer.locator(".thoughts .thinking")).to_be_hidden()  # folded until opened
    answer.locator(".thoughts summary").click()
    expect(answer.locator(".thoughts .thinking")).to_have_text("The user says hello.")
    shot(page, "chat-thoughts")


def test_chat_renders_markdown_and_escapes_html(page: Page) -> None:
    rendered = page.evaluate("""() => HearthMarkdown.render(
        "# Title\\n**bold** and `code`\\n\\n```python\\ndef f():\\n    return 1  # one\\n```\\n<img src=x onerror=alert(1)>")""")
    assert "<strong>bold</strong>" in rendered and "<code>code</code>" in rendered
    assert '<span class="tok-kw">def</span>' in rendered and '<span class="tok-com"># one</span>' in rendered
    assert "<img" not in rendered and "&lt;img" in rendered


def test_attach_an_image_for_a_vision_model(page: Page, tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(png("red"))
    page.select_option("#chat-model", "fake-chat")
    expect(page.locator("#chat-attach")).to_be_disabled()  # this model takes no images
    page.select_option("#chat-model", "tiny-llava")
    expect(page.locator("#chat-attach")).to_be_enabled()
    page.set_input_files("#chat-attach", str(picture))
    expect(page.locator("#chat-attached")).to_have_text("red.png")
    page.fill("#chat-max-tokens", "4")
    page.fill("#chat-input", "what is this picture")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#chat-send")
    parts = sent.value.post_data_json["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    expect(page.locator(".msg.assistant .meta").last).to_contain_text("tokens", timeout=60_000)
    expect(page.locator(".msg.user img").last).to_be_visible()
    expect(page.locator("#chat-error")).to_be_hidden()
    shot(page, "chat-vision")


def test_stop_button_ends_a_stream(page: Page, server: HearthServer) -> None:
    write_yaml(server.models_dir, "slow", {"name": "slow", "backend": "fake",
                                           "fake": {"token_delay": 0.1, "sample_length": 300}})
    page.reload()
    page.select_option("#chat-model", "slow")
    page.fill("#chat-input", "go on")
    page.keyboard.press("Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".md")).not_to_be_empty(timeout=30_000)
    page.click("#chat-stop")
    expect(answer.locator(".meta")).to_contain_text("stopped")
    assert len(answer.locator(".md").inner_text().split()) < 300


def test_api_errors_are_shown(page: Page) -> None:
    page.select_option("#chat-model", "fake-chat")
    page.fill("#chat-temperature", "7")
    page.fill("#chat-input", "hello")
    page.click("#chat-send")
    error = page.locator("#chat-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("temperature")
    expect(error).to_contain_text("HTTP 400")
    shot(page, "chat-error")
    # The message comes back to the box, to fix and send again; the conversation keeps no failed turn.
    expect(page.locator("#chat-input")).to_have_value("hello")
    expect(page.locator(".msg")).to_have_count(0)


def test_max_tokens_follows_the_models_context(page: Page) -> None:
    """The first message of a chat with a short-context model is not refused for asking more than its context."""
    page.select_option("#chat-model", "fake-short")
    expect(page.locator("#chat-max-tokens")).to_have_value("100")
    page.fill("#chat-input", "hello")
    page.click("#chat-send")
    expect(page.locator(".msg.assistant .meta")).to_be_visible(timeout=30_000)
    expect(page.locator("#chat-error")).to_be_hidden()
    page.select_option("#chat-model", "smollm2")  # 2048 tokens: room for the default again
    expect(page.locator("#chat-max-tokens")).to_have_value("512")
    page.click("#chat-new")


def test_transcribe_an_uploaded_wav(page: Page, server: HearthServer, tmp_path: Path) -> None:
    speech = httpx.post(f"{server.base_url}/v1/audio/speech", timeout=120, json={
        "model": "en_US-joe-medium", "input": SENTENCE, "voice": "alloy", "response_format": "wav"})
    assert speech.status_code == 200
    wav = tmp_path / "fox.wav"
    wav.write_bytes(speech.content)
    page.click("#tab-speech")
    page.select_option("#stt-model", "whisper-tiny.en")
    page.set_input_files("#stt-file", str(wav))
    page.click("#stt-go")
    expect(page.locator("#stt-result")).to_contain_text("lazy dog", timeout=120_000)
    assert "audio.transcriptions.create" in page.locator(".snippet[data-for=speech]").inner_text()
    shot(page, "speech-transcript")


def test_synthesise_playable_audio(page: Page) -> None:
    page.click("#tab-speech")
    page.select_option("#tts-model", "en_US-joe-medium")
    page.select_option("#tts-format", "wav")
    page.fill("#tts-text", "Hello from the web page.")
    page.click("#tts-go")
    audio = page.locator("#tts-result audio")
    expect(audio).to_have_count(1, timeout=120_000)
    # The browser decodes it: it knows the duration once the metadata is read.
    duration = page.evaluate("""() => new Promise((resolve, reject) => {
        const audio = document.querySelector('#tts-result audio');
        if (audio.readyState >= 1) return resolve(audio.duration);
        audio.addEventListener('loadedmetadata', () => resolve(audio.duration));
        audio.addEventListener('error', () => reject(new Error('audio could not be decoded')));
    })""")
    assert 0.5 < duration < 10
    expect(page.locator("#tts-result a[download]")).to_have_attribute("download", "speech.wav")
    shot(page, "speech-synthesis")


def test_generate_an_image(page: Page) -> None:
    page.click("#tab-images")
    page.select_option("#img-model", "tiny-sd")
    page.fill("#img-size", "64x64")
    page.fill("#img-steps", "2")
    page.fill("#img-seed", "3")
    page.fill("#img-n", "2")
    page.click("#img-go")
    images = page.locator("#img-grid img")
    expect(images).to_have_count(2, timeout=120_000)
    sizes = page.evaluate("""() => Promise.all([...document.querySelectorAll('#img-grid img')].map((img) =>
        img.decode().then(() => [img.naturalWidth, img.naturalHeight])))""")
    assert sizes == [[64, 64], [64, 64]]
    assert "client.images.generate" in page.locator(".snippet[data-for=images]").inner_text()
    shot(page, "images")


def test_bad_image_size_shows_the_api_message(page: Page) -> None:
    page.click("#tab-images")
    page.select_option("#img-model", "tiny-sd")
    page.fill("#img-size", "60x60")
    page.click("#img-go")
    expect(page.locator("#img-error")).to_contain_text("60x60", timeout=60_000)


def test_rerank_documents(page: Page) -> None:
    page.click("#tab-embeddings")
    page.select_option("#emb-model", "all-minilm-l6-v2")
    page.click("#emb-rank")
    ranked = page.locator("#emb-result li")
    expect(ranked).to_have_count(3, timeout=60_000)
    assert "Paris" in ranked.nth(2).inner_text(), "the unrelated document ranks last"
    page.click("#emb-embed")
    expect(page.locator("#emb-vector")).to_contain_text("384 dimensions", timeout=30_000)
    shot(page, "embeddings")


def test_models_tab_loads_and_unloads(page: Page) -> None:
    page.click("#tab-models")
    row = page.locator("#models-table tr[data-model=fake-chat]")
    state = row.locator(".state")
    if state.inner_text() != "not loaded":
        row.get_by_role("button", name="Unload fake-chat").click()
    expect(state).to_have_text("not loaded", timeout=30_000)
    row.get_by_role("button", name="Load fake-chat").click()
    expect(state).to_have_text("idle", timeout=30_000)
    expect(row).to_contain_text("chat")  # the runner's own capabilities, once loaded
    shot(page, "models-loaded")
    row.get_by_role("button", name="Unload fake-chat").click()
    expect(state).to_have_text("not loaded", timeout=30_000)
    # A model that fails to load says why.
    broken = page.locator("#models-table tr[data-model=broken]")
    broken.get_by_role("button", name="Load broken").click()
    expect(broken.locator(".state")).to_have_text("failed", timeout=30_000)
    expect(broken).to_contain_text("weights are corrupt")
    expect(page.locator("#models-error")).to_contain_text("weights are corrupt")
    expect(page.locator("#gallery-list li").first).to_be_visible()
    page.fill("#gallery-search", "whisper")
    assert all("whisper" in text.lower() for text in page.locator("#gallery-list li").all_inner_texts())
    shot(page, "models")


def test_gallery_install_shows_progress_then_the_model(page: Page) -> None:
    page.click("#tab-models")
    page.fill("#gallery-search", "web-")
    entry = page.locator("#gallery-list li[data-entry=web-fake]")
    # Record every progress value the page shows while the job runs.
    page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        for (const bar of document.querySelectorAll('#gallery-list progress')) window.seen.push(bar.value);
    }).observe(document.getElementById('gallery-list'), {childList: true, subtree: true}); }""")
    entry.get_by_role("button", name="Install web-fake").click()
    expect(entry).to_contain_text("installed", timeout=60_000)
    assert page.evaluate("() => window.seen.length") > 0, "no progress bar was shown"
    expect(page.locator("#models-table tr[data-model=web-fake] .state")).to_have_text("not loaded")
    bad = page.locator("#gallery-list li[data-entry=web-bad-sum]")
    bad.get_by_role("button", name="Install web-bad-sum").click()
    expect(bad.locator(".error")).to_contain_text(f"expected sha256 {'0' * 64}, got {SHA}", timeout=60_000)
    # An entry Hearth cannot run says why, with no install button; the box hides such entries.
    elsewhere = page.locator("#gallery-list li[data-entry=web-elsewhere]")
    expect(elsewhere.locator(".reason")).to_contain_text("backend 'crispasr' is not one Hearth has")
    assert elsewhere.get_by_role("button").count() == 0
    expect(page.locator("#gallery-summary")).to_contain_text("1 cannot be installed here")
    shot(page, "gallery")
    page.check("#gallery-installable")
    expect(elsewhere).to_have_count(0)
    expect(page.locator("#gallery-list li[data-entry=web-fake]")).to_have_count(1)


def test_microphone_recording_is_transcribed(page: Page) -> None:
    """Chromium's fake microphone (a beep) records through MediaRecorder; the recording reaches whisper."""
    page.click("#tab-speech")
    page.select_option("#stt-model", "whisper-tiny.en")
    page.click("#stt-record")
    expect(page.locator("#stt-record")).to_have_text("Stop recording")
    page.wait_for_timeout(1500)
    page.click("#stt-record")
    expect(page.locator("#stt-source")).to_contain_text("Recording:")
    with page.expect_response("**/v1/audio/transcriptions") as answered:
        page.click("#stt-go")
    assert answered.value.status == 200
    expect(page.locator("#stt-result")).not_to_have_text("Transcribing…", timeout=60_000)
    expect(page.locator("#stt-error")).to_be_hidden()


def test_keyboard_alone(page: Page) -> None:
    page.locator("#tab-chat").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#speech")).to_be_visible()
    expect(page.locator("#tab-speech")).to_be_focused()
    page.keyboard.press("End")
    expect(page.locator("#models")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#chat")).to_be_visible()
    # Tab into the form and send with Enter, no mouse.
    page.locator("#chat-model").focus()
    page.keyboard.press("Tab")  # temperature
    page.keyboard.press("Tab")  # max tokens
    page.keyboard.press("Tab")  # new chat
    page.keyboard.press("Enter")
    expect(page.locator(".msg")).to_have_count(0)
    page.locator("#chat-model").select_option("fake-chat")
    page.locator("#chat-input").focus()
    page.keyboard.type("hello by keyboard")
    page.keyboard.press("Enter")
    expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens", timeout=30_000)


def test_phone_width(browser: Browser, server: HearthServer) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        phone = context.new_page()
        phone.goto(server.base_url + "/")
        for tab in ("chat", "speech", "images", "embeddings", "models"):
            phone.click(f"#tab-{tab}")
            expect(phone.locator(f"#{tab}")).to_be_visible()
            phone.wait_for_timeout(200)
            overflow = phone.evaluate("() => document.documentElement.scrollWidth")
            assert overflow <= 375, f"the {tab} tab is {overflow} px wide on a 375 px screen"
            phone.screenshot(path=str(SHOTS / f"phone-{tab}.png"), full_page=True)
    finally:
        context.close()


def test_api_key_is_asked_once_and_kept(browser: Browser, server: HearthServer, tmp_path: Path) -> None:
    guarded = HearthServer(server.models_dir, tmp_path / "log.txt", "--api-key", "sesame")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(guarded.base_url + "/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("missing API key")
        page.fill("#key-input", "sesame")
        page.click("#key-save")
        expect(page.locator("#chat-model option[value=fake-chat]")).to_have_count(1)
        page.select_option("#chat-model", "fake-chat")
        page.fill("#chat-input", "hi")
        page.click("#chat-send")
        expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens", timeout=30_000)
        assert "Authorization: Bearer $HEARTH_API_KEY" in page.locator(".snippet[data-for=chat]").inner_text()
        page.reload()  # kept in local storage: not asked again
        expect(page.locator("#chat-model option[value=fake-chat]")).to_have_count(1)
        expect(dialog).to_be_hidden()
        # The page's files need no key, but the API behind them does.
        assert httpx.get(guarded.base_url + "/web/app.js").status_code == 200
        assert httpx.get(guarded.base_url + "/runners/models").status_code == 401
        assert httpx.get(guarded.base_url + "/web/../runners/models").status_code in (401, 404)
    finally:
        context.close()
        guarded.stop()


def test_voice_tab_talks_through_the_microphone(browser: Browser, server: HearthServer, tmp_path: Path) -> None:
    """Chromium's fake microphone plays a spoken question once; the page streams it to /v1/realtime, shows what was
    heard and the answer as they come, plays the answer, and stops when asked."""
    spoken = server.http().post("/v1/audio/speech", json={"model": "en_US-joe-medium", "input":
                                                          "What is the capital of France?", "response_format": "pcm"})
    assert spoken.status_code == 200
    question = tmp_path / "question.wav"
    question.write_bytes(wav(bytes(24_000) + spoken.content + bytes(24_000 * 2 * 20)))  # 0.5 s, the question, 20 s
    # A browser of its own, whose fake microphone plays the question (through the module's Playwright).
    listening = browser.browser_type.launch(executable_path=CHROMIUM, args=[
        *FLAGS, f"--use-file-for-fake-audio-capture={question}%noloop"])
    try:
        page = listening.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.base_url + "/#voice")
        expect(page.locator("#voice-model option[value=talk]")).to_have_count(1)
        page.select_option("#voice-model", "talk")
        page.click("#voice-start")
        user = page.locator("#voice-log [data-role=user] .text")
        expect(user.first).to_contain_text("capital", ignore_case=True, timeout=60_000)
        expect(user.first).to_contain_text("France", ignore_case=True)
        answer = page.locator("#voice-log [data-role=assistant] .text")
        expect(answer.first).not_to_be_empty(timeout=60_000)
        expect(page.locator("#voice-status")).to_have_text("Listening…", timeout=60_000)
        assert float(page.locator("#voice-log").get_attribute("data-audio-seconds") or 0) > 0.3
        shot(page, "voice")
        page.click("#voice-stop")
        expect(page.locator("#voice-status")).to_have_text("Stopped.")
        expect(page.locator("#voice-start")).to_be_enabled()
        assert errors == [], errors
    finally:
        listening.close()
