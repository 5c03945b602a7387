"""Hostile but fair input: each reproducer of issue 26 gets its 4xx (or a clean end), in the client's protocol."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import HearthServer, write_yaml

from hearth.net import AddressPolicy, FetchRefused, resolve_checked

SURROGATE = "a\\ud800b"  # as JSON spells it: a lone high surrogate
ROUTES = {
    "/v1/chat/completions": ('{"model":"fake-model","messages":[{"role":"user","content":"%s"}]}',
                             "messages[0].content"),
    "/v1/completions": ('{"model":"fake-model","prompt":"%s"}', "prompt"),
    "/v1/tokenize": ('{"model":"fake-model","content":"%s"}', "content"),
    "/v1/embeddings": ('{"model":"fake-model","input":"%s"}', "input"),
    "/v1/messages": ('{"model":"fake-model","max_tokens":5,"messages":[{"role":"user","content":"%s"}]}',
                     "messages[0].content"),
    "/v1/messages/count_tokens": ('{"model":"fake-model","messages":[{"role":"user","content":"%s"}]}',
                                  "messages[0].content"),
    "/v1/responses": ('{"model":"fake-model","input":"%s"}', "input"),
    "/api/chat": ('{"model":"fake-model","stream":false,"messages":[{"role":"user","content":"%s"}]}',
                  "messages[0].content"),
    "/api/generate": ('{"model":"fake-model","stream":false,"prompt":"%s"}', "prompt"),
    "/api/embed": ('{"model":"fake-model","input":"%s"}', "input"),
    "/v1/audio/speech": ('{"model":"fake-model","input":"%s","voice":"x"}', "input"),
    "/v1/chat/completions?stop": ('{"model":"fake-model","messages":[{"role":"user","content":"hi"}],"stop":["%s"]}',
                                  "stop[0]"),
}


@pytest.mark.parametrize("route", ROUTES)
def test_a_lone_surrogate_is_a_400_naming_the_field(fake_server: HearthServer, route: str) -> None:
    body, field = ROUTES[route]
    reply = httpx.post(fake_server.base_url + route.split("?")[0], content=body % SURROGATE,
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()
    if route.startswith("/api/"):
        message = error["error"]  # Ollama's shape
    elif route.startswith("/v1/messages"):
        assert error["type"] == "error"  # Anthropic's shape
        message = error["error"]["message"]
    else:
        assert error["error"]["param"] == field
        message = error["error"]["message"]
    assert field in message and "surrogate" in message
    # A surrogate pair (an emoji spelled as JSON's two escapes) is fine.
    paired = httpx.post(fake_server.base_url + "/v1/chat/completions", headers={"content-type": "application/json"},
                        content=ROUTES["/v1/chat/completions"][0] % "\\ud83d\\ude00", timeout=30)
    assert paired.status_code == 200
    assert "Traceback" not in fake_server.log()


def test_nul_in_speech_input_is_a_400(fake_server: HearthServer) -> None:
    for field in ("input", "voice"):
        body = {"model": "fake-model", "input": "hello", "voice": "x", field: "a\x00b"}
        reply = httpx.post(fake_server.base_url + "/v1/audio/speech", json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field


def multipart_chunks(size: int) -> Iterator[bytes]:
    yield (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake-model\r\n--B\r\n'
           b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n')
    for _ in range(size // 10_000):
        yield b"\0" * 10_000
    yield b"\r\n--B--\r\n"


def test_an_oversized_chunked_upload_is_a_413(start_server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_yaml(models, "fake", {"name": "fake-model", "backend": "fake"})
    server = start_server(models, env={"HEARTH_MAX_BODY_BYTES": "100000"})
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits", "/v1/vad"):
        reply = httpx.post(server.base_url + path, content=multipart_chunks(500_000),
                           headers={"content-type": "multipart/form-data; boundary=B"}, timeout=30)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large", (path, reply.text)


def test_loose_model_files_follow_the_symlink_rule(start_server, tmp_path: Path) -> None:
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.gguf").write_text("SECRET-TOKEN=abc\n")
    (models / "out.gguf").symlink_to(elsewhere / "secret.gguf")
    (models / "notes.gguf").write_text("Private notes\n")  # inside, but no GGUF
    server = start_server(models)
    names = [m.id for m in server.client().models.list().data]
    assert "out" not in names and "notes" in names
    assert "outside the models directory" in server.log()
    reply = server.http().post("/v1/chat/completions", json={"model": "notes", "messages": [
        {"role": "user", "content": "hi"}]})
    assert "not a GGUF file" in reply.json()["error"]["message"]
    assert "Priv" not in reply.text and "SECRET" not in server.log()


@pytest.mark.parametrize(("host", "allowed"), [
    ("::7f00:1", False),            # IPv4-compatible 127.0.0.1
    ("64:ff9b::7f00:1", False),     # NAT64 (RFC 6052) of 127.0.0.1
    ("64:ff9b::a00:1", False),      # NAT64 of 10.0.0.1
    ("64:ff9b:1::a00:1", False),    # local-use NAT64 (RFC 8215)
    ("::ffff:127.0.0.1", False),    # IPv4-mapped
    ("2002:7f00:1::", False),       # 6to4 of 127.0.0.1
    ("2002:a00:1::1", False),       # 6to4 of 10.0.0.1
    ("64:ff9b::808:808", True),     # NAT64 of a public address
    ("2002:808:808::1", True),
    ("8.8.8.8", True),
])
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_carry(host: str, allowed: bool) -> None:
    async def check() -> bool:
        try:
            await resolve_checked(host, 80, AddressPolicy())
        except FetchRefused:
            return False
        return True

    assert asyncio.run(check()) is allowed


@pytest.fixture(scope="module")
def bomb() -> str:
    """A 12000x12000 PNG of one colour: about 440 KB, 144 megapixels (576 MB once decoded)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12000, 12000), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _rss_mb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) // 1024


def _eight_at_once(server: HearthServer, url: str) -> tuple[list[int], int, int, int]:
    body = {"model": "seer", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    server.http().post("/v1/chat/completions", json={"model": "seer", "max_tokens": 2, "messages": [
        {"role": "user", "content": "warm up"}]})
    time.sleep(0.5)
    idle = peak = _rss_mb(server.process.pid)
    statuses: list[int] = []
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb(server.process.pid))
            time.sleep(0.02)

    def send() -> None:
        statuses.append(httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300).status_code)

    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [threading.Thread(target=send) for _ in range(8)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    time.sleep(1)
    done.set()
    watcher.join()
    return statuses, idle, peak, _rss_mb(server.process.pid)


def test_image_bombs_are_refused_by_their_pixels_before_decoding(start_server, tmp_path: Path, bomb: str) -> None:
    write_yaml(tmp_path, "seer", {"name": "seer", "backend": "fake", "fake": {"vision": True}})
    server = start_server(tmp_path)
    statuses, idle, peak, after = _eight_at_once(server, bomb)
    assert statuses == [400] * 8
    assert peak - idle < 100 and after - idle < 16, (idle, peak, after)
    reply = server.http().post("/v1/chat/completions", json={"model": "seer", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": bomb}}]}]}).json()
    assert "megapixels" in reply["error"]["message"] and "image_max_megapixels" in reply["error"]["message"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the API process's memory from /proc")
def test_large_images_within_the_limit_stay_in_the_memory_budget(start_server, tmp_path: Path, bomb: str) -> None:
    """With the pixel limit raised to let them in, eight at once decode within the budget (1 GB by default) and the
    process's memory comes back afterwards."""
    write_yaml(tmp_path, "seer", {"name": "seer", "backend": "fake", "fake": {"vision": True}})
    server = start_server(tmp_path, env={"HEARTH_IMAGE_MAX_MEGAPIXELS": "150"})
    statuses, idle, peak, after = _eight_at_once(server, bomb)
    assert statuses == [200] * 8
    assert peak - idle < 1024 + 64, (idle, peak)
    assert after - idle < max(idle * 0.1, 16), (idle, after)


def test_sigterm_drains_streams_and_queued_requests(start_server, tmp_path: Path) -> None:
    """Eight streams running and two requests waiting (for a model that is still loading) when SIGTERM comes: the
    waiting ones get 503, the streams their protocol's error and end after the grace, and no runner is left."""
    import signal
    import subprocess

    write_yaml(tmp_path, "slow", {"name": "slow", "backend": "fake",
                                  "fake": {"token_delay": 0.1, "reply": " ".join(["word"] * 400)}})
    write_yaml(tmp_path, "loading", {"name": "loading", "backend": "fake", "fake": {"load_delay": 60}})
    server = start_server(tmp_path, env={"HEARTH_SHUTDOWN_GRACE_SECONDS": "2"})
    results: dict[str, list[str]] = {}
    begun: set[str] = set()  # streams whose first event has arrived

    def stream(key: str, path: str, body: dict) -> None:
        lines: list[str] = []
        try:
            with httpx.stream("POST", server.base_url + path, json=body, timeout=60) as reply:
                lines.append(str(reply.status_code))
                for line in reply.iter_lines():
                    if line:
                        lines.append(line)
                        begun.add(key)
        except httpx.HTTPError as exc:  # a cut connection is what this test must never see
            lines.append(f"broken: {exc!r}")
        results[key] = lines

    chat = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    jobs = [(f"openai-{i}", "/v1/chat/completions", chat) for i in range(5)]
    jobs += [("anthropic", "/v1/messages", {**chat, "max_tokens": 1000}), ("ollama", "/api/chat", chat),
             ("responses", "/v1/responses", {"model": "slow", "stream": True, "input": "hi"})]
    jobs += [(f"queued-{i}", "/v1/chat/completions", {**chat, "model": "loading"}) for i in range(2)]
    threads = [threading.Thread(target=stream, args=job) for job in jobs]
    # The streams first, then the queued requests: models load one at a time, so a 'loading' load that began first
    # would hold the 'slow' model's load (and every stream) for its whole minute.
    for thread in threads[:8]:
        thread.start()
    deadline = time.monotonic() + 60  # every stream running
    while time.monotonic() < deadline and len(begun) < 8:
        time.sleep(0.1)
    for thread in threads[8:]:  # these wait for their model's load
        thread.start()
    time.sleep(1.0)
    runners = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(runners) >= 2  # the slow model's runner and the loading one's
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=30)
    assert server.process.wait(timeout=30) == 0
    for key, lines in results.items():
        assert not any(line.startswith("broken") for line in lines), (key, lines)
        if key.startswith("queued"):
            assert lines[0] == "503", (key, lines)
            continue
        assert lines[0] == "200", (key, lines)
        last = lines[-1]
        if key.startswith("openai") or key == "responses":
            assert last == "data: [DONE]" or '"error"' in last, (key, lines[-3:])
            assert any("shutting down" in line for line in lines), (key, lines[-3:])
        elif key == "anthropic":
            assert "event: error" in lines[-2] or '"type":"error"' in last.replace(" ", ""), (key, lines[-3:])
        else:
            assert '"error"' in last and "shutting down" in last, (key, lines[-3:])
    alive = [pid for pid in runners if Path(f"/proc/{pid}").exists()]
    assert not alive, f"runner processes left: {alive}"


def test_a_stopped_runner_is_caught_by_the_watchdog(start_server, tmp_path: Path) -> None:
    """A runner under SIGSTOP answers nothing: its stream and the request beside it end with a clear error within
    the watchdog's time, and the next request gets a fresh runner."""
    import signal
    import subprocess

    write_yaml(tmp_path, "slow", {"name": "slow", "backend": "fake",
                                  "fake": {"token_delay": 0.1, "reply": " ".join(["word"] * 400)}})
    server = start_server(tmp_path, env={"HEARTH_RUNNER_WATCHDOG_SECONDS": "2"})
    chat = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
    results: dict[str, object] = {}

    def streamed() -> None:
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**chat, "stream": True},
                          timeout=60) as reply:
            results["stream"] = [line for line in reply.iter_lines() if line]

    def whole() -> None:
        results["whole"] = httpx.post(server.base_url + "/v1/chat/completions", json=chat, timeout=60)

    threads = [threading.Thread(target=streamed), threading.Thread(target=whole)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    runner = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(runner) == 1
    os.kill(int(runner[0]), signal.SIGSTOP)
    started = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    assert time.monotonic() - started < 15
    lines = results["stream"]
    assert isinstance(lines, list) and "made no progress" in lines[-2] and lines[-1] == "data: [DONE]", lines[-2:]
    reply = results["whole"]
    assert isinstance(reply, httpx.Response) and reply.status_code == 503
    assert "made no progress for 2 s" in reply.json()["error"]["message"]
    again = httpx.post(server.base_url + "/v1/chat/completions", json={**chat, "max_tokens": 3}, timeout=60)
    assert again.status_code == 200


def test_slow_headers_and_bodies_are_timed_out(start_server, tmp_path: Path) -> None:
    """A client that trickles its headers, or stops in the middle of its body, gets 408 and its connection closed;
    a stream that outlasts both timeouts is untouched."""
    import socket

    write_yaml(tmp_path, "slow", {"name": "slow", "backend": "fake",
                                  "fake": {"token_delay": 0.05, "reply": " ".join(["word"] * 60)}})
    server = start_server(tmp_path, env={"HEARTH_HEADER_TIMEOUT_SECONDS": "1", "HEARTH_BODY_TIMEOUT_SECONDS": "1"})
    port = int(server.base_url.rsplit(":", 1)[1])

    def hold(first: bytes) -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(first)
            started, answer = time.monotonic(), b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return time.monotonic() - started, answer
                answer += chunk

    many = [threading.Thread(target=hold, args=(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",)) for _ in range(20)]
    for thread in many:
        thread.start()
    waited, answer = hold(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    assert waited < 5 and answer.startswith(b"HTTP/1.1 408"), answer[:80]
    waited, answer = hold(b"")  # connected, and nothing sent at all
    assert waited < 5 and answer.startswith(b"HTTP/1.1 408")
    body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).encode()
    waited, answer = hold(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    assert waited < 5 and b"408" in answer.split(b"\r\n")[0], answer[:80]
    for thread in many:
        thread.join(timeout=10)
    # A stream of about three seconds, well past both timeouts, arrives whole.
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                      json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) > 50


def test_the_openapi_document_says_what_the_server_answers(fake_server: HearthServer) -> None:
    document = httpx.get(fake_server.base_url + "/openapi.json", timeout=30).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # invalid bodies are 400s
            for status in ("400", "401", "404", "413", "429", "503"):
                schema = responses[status]["content"]["application/json"]["schema"]["$ref"]
                expected = "OllamaError" if path.startswith("/api/") else \
                    "AnthropicError" if path.startswith("/v1/messages") else "Error"
                assert schema.endswith("/" + expected), (method, path, status)
    paths = document["paths"]
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits", "/v1/images/variations",
                 "/v1/vad"):
        form = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["required"] and form["properties"], path
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in paths["/api/chat"]["post"]["responses"]["200"]["content"]
