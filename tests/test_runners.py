"""Runner lifecycle end to end: crashes, shutdown, eviction, preloading, API keys."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port, read_metrics, write_yaml

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_yaml(tmp_path, "a", {"name": "model-a", "backend": "fake"})
    write_yaml(tmp_path, "b", {"name": "model-b", "backend": "fake"})
    write_yaml(tmp_path, "slow", {"name": "slow-model", "backend": "fake",
                                  "fake": {"token_delay": 0.1, "reply": " ".join(["word"] * 100)}})
    write_yaml(tmp_path, "loading", {"name": "slow-load", "backend": "fake", "fake": {"load_delay": 1.5}})
    write_yaml(tmp_path, "loading-too", {"name": "slow-load-too", "backend": "fake", "fake": {"load_delay": 1.5}})
    return tmp_path


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def ask_in_background(client: openai.OpenAI, errors: list[Exception]) -> threading.Thread:
    """A long slow-model request in a thread of its own; what it raises goes into `errors`."""

    def ask() -> None:
        try:
            client.chat.completions.create(model="slow-model", messages=MESSAGES, max_tokens=100)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_runner_killed_mid_request_fails_clearly_and_restarts(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    client = server.client()
    client.chat.completions.create(model="slow-model", messages=MESSAGES, max_tokens=1)
    pid = server.runner_pid("slow-model")

    errors: list[Exception] = []
    thread = ask_in_background(client, errors)
    assert wait_for(lambda: server.runners()[0]["active_requests"] == 1)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], openai.APIStatusError)
    assert errors[0].status_code == 503
    assert "SIGKILL" in errors[0].message and "restarted" in errors[0].message
    # The server stays up, and the next request gets a fresh runner.
    assert server.http().get("/healthz").status_code == 200
    reply = client.chat.completions.create(model="slow-model", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content == "word word "
    assert server.runner_pid("slow-model") != pid
    samples = read_metrics(server)
    assert samples[("hearth_runner_crashes_total", (("model", "slow-model"),))] == 1
    assert samples[("hearth_model_loads_total", (("model", "slow-model"), ("result", "ok")))] == 2
    assert samples[("hearth_http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"),
                                                   ("status", "503")))] == 1


def test_metrics_count_requests_tokens_and_loads(start_server, models_dir: Path) -> None:
    write_yaml(models_dir, "broken", {"name": "broken", "backend": "fake", "fake": {"fail_load": "no weights"}})
    server = start_server(models_dir, "--api-key", "sk-metrics")
    key = {"Authorization": "Bearer sk-metrics"}
    client = server.client(api_key="sk-metrics")
    replies = [client.chat.completions.create(model="model-a", messages=MESSAGES) for _ in range(2)]
    chunks = list(client.chat.completions.create(model="model-a", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    usages = [r.usage for r in replies] + [chunks[-1].usage]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    # Guarded like every route but health.
    assert httpx.get(f"{server.base_url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{server.base_url}/healthz", timeout=10).status_code == 200
    samples = read_metrics(server, key)

    def requests(method: str, route: str, status: str) -> float:
        return samples[("hearth_http_requests_total", (("method", method), ("route", route), ("status", status)))]

    assert requests("POST", "/v1/chat/completions", "200") == 3
    assert requests("POST", "/v1/chat/completions", "404") == 1
    assert requests("GET", "unrouted", "401") == 1 and requests("GET", "/healthz", "200") >= 1  # and start-up polls
    assert samples[("hearth_http_request_duration_seconds_count",
                    (("method", "POST"), ("route", "/v1/chat/completions")))] == 4
    a = (("model", "model-a"),)
    assert samples[("hearth_generations_total", (("finish_reason", "stop"), ("model", "model-a")))] == 3
    assert samples[("hearth_prompt_tokens_total", a)] == sum(u.prompt_tokens for u in usages) > 0
    assert samples[("hearth_completion_tokens_total", a)] == sum(u.completion_tokens for u in usages) > 0
    assert samples[("hearth_model_loads_total", (("model", "model-a"), ("result", "ok")))] == 1
    assert samples[("hearth_model_load_duration_seconds_count", a)] == 1
    assert samples[("hearth_models_loaded", ())] == 1
    assert samples[("hearth_model_requests_in_flight", a)] == 0
    assert any(name == "hearth_info" for name, _ in samples)
    # A runner that died between requests counts as a crash when the next request finds it dead.
    pid = next(r["pid"] for r in server.runners(key) if r["name"] == "model-a")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists())  # reaped by the server
    assert client.chat.completions.create(model="model-a", messages=MESSAGES).choices[0].message.content
    after = read_metrics(server, key)
    assert after[("hearth_runner_crashes_total", a)] == 1
    assert after[("hearth_model_loads_total", (("model", "model-a"), ("result", "ok")))] == 2
    # A model that fails to load counts as such.
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="broken", messages=MESSAGES)
    assert read_metrics(server, key)[("hearth_model_loads_total", (("model", "broken"), ("result", "failed")))] == 1


def test_runners_at_work_are_marked_on_the_board_they_share_the_cores_by(start_server, models_dir: Path) -> None:
    """The server keeps a byte per runner it started, set while a request computes on it, and passes the file to
    each runner (hearth/cores.py); a runner that dies mid-request is cleared, so no other runner keeps giving way."""
    server = start_server(models_dir)
    client = server.client()
    client.chat.completions.create(model="slow-model", messages=MESSAGES, max_tokens=1)
    client.chat.completions.create(model="model-a", messages=MESSAGES, max_tokens=1)
    (socket_dir,) = server.socket_dirs()
    board = Path(socket_dir) / "cores"

    def busy() -> int:
        return sum(1 for byte in board.read_bytes() if byte)

    assert busy() == 0
    for name in ("slow-model", "model-a"):
        argv = Path(f"/proc/{server.runner_pid(name)}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--cores-board") + 1] == str(board).encode()
    errors: list[Exception] = []
    thread = ask_in_background(client, errors)
    assert wait_for(lambda: busy() == 1)
    client.chat.completions.create(model="model-a", messages=MESSAGES, max_tokens=1)
    assert busy() == 1  # model-a's request has ended; slow-model's goes on
    os.kill(server.runner_pid("slow-model"), signal.SIGKILL)
    thread.join(30)
    assert len(errors) == 1 and busy() == 0
    client.chat.completions.create(model="slow-model", messages=MESSAGES, max_tokens=1)  # a new runner, a free byte
    assert busy() == 0


def test_runner_killed_mid_stream_sends_error_then_done(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    body = {"model": "slow-model", "messages": MESSAGES, "stream": True, "max_tokens": 100}
    frames: list[str] = []
    with server.http().stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            frames.append(line[6:])
            if len(frames) == 3:
                os.kill(server.runner_pid("slow-model"), signal.SIGKILL)
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["code"] == "runner_crashed" and "slow-model" in error["message"]


def test_sigterm_stops_runners_and_removes_sockets(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    client = server.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    client.chat.completions.create(model="model-b", messages=MESSAGES)
    pids = [r["pid"] for r in server.runners()]
    (socket_dir,) = server.socket_dirs()
    assert len(list(Path(socket_dir).glob("*.sock"))) == 2
    assert server.stop() == 0
    assert not Path(socket_dir).exists()
    for pid in pids:
        assert wait_for(lambda pid=pid: not _alive(pid), 5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of the (now gone) server counts as stopped
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_runner_exits_when_server_is_killed(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    server.client().chat.completions.create(model="model-a", messages=MESSAGES)
    pid = server.runner_pid("model-a")
    server.process.kill()
    server.process.wait()
    assert wait_for(lambda: not _alive(pid), 10), "an orphaned runner kept running"


def test_least_recently_used_model_is_unloaded(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, "--max-loaded-models", "1")
    client = server.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    assert [r["name"] for r in server.runners()] == ["model-a"]
    client.chat.completions.create(model="model-b", messages=MESSAGES)
    assert [r["name"] for r in server.runners()] == ["model-b"]
    assert "unloading 'model-a' (least recently used)" in server.log()


def test_idle_models_are_unloaded(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, "--idle-unload-minutes", "0.02")  # 1.2 s
    server.client().chat.completions.create(model="model-a", messages=MESSAGES)
    assert server.runners()
    assert wait_for(lambda: not server.runners(), 10)


def test_requests_during_load_wait_for_it(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    client = server.client()
    results: list[str] = []

    def ask() -> None:
        results.append(client.chat.completions.create(model="slow-load", messages=MESSAGES).choices[0].finish_reason)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == ["stop"] * 3
    assert server.log().count("Loading model 'slow-load' with backend fake") == 1


def test_models_load_one_at_a_time(start_server, models_dir: Path) -> None:
    """Each load sizes itself by the memory available, so two models asked for at once load one after the other
    (their runner processes still start together)."""
    server = start_server(models_dir)
    client = server.client()
    results: list[str] = []
    threads = [threading.Thread(target=lambda name=name: results.append(client.chat.completions.create(
        model=name, messages=MESSAGES).choices[0].finish_reason)) for name in ("slow-load", "slow-load-too")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == ["stop", "stop"]
    log = server.log()
    waited = [name for name in ("slow-load", "slow-load-too")
              if f"model '{name}' waits for '{'slow-load-too' if name == 'slow-load' else 'slow-load'}' to finish "
                 f"loading: models load one at a time" in log]
    assert len(waited) == 1
    # The one that waited was ready only after both loads (1.5 s each) had run, one after the other.
    ready = float(re.search(rf"model '{waited[0]}' ready in ([0-9.]+) s", log).group(1))
    assert ready >= 3.0


def test_preload_and_readiness(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, "--preload", "slow-load")
    first = server.http().get("/readyz")
    assert first.status_code == 503 and first.json()["status"] == "starting"
    assert wait_for(lambda: server.http().get("/readyz").status_code == 200, 15)
    assert [r["name"] for r in server.runners()] == ["slow-load"]


def test_manual_load_and_unload(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    http = server.http()
    loaded = http.post("/runners/load", json={"model": "model-a"}).json()
    assert loaded["state"] == "ready" and loaded["name"] == "model-a"
    assert http.post("/runners/unload", json={"model": "model-a"}).json()["unloaded"] is True
    assert server.runners() == []
    assert http.post("/runners/unload", json={"model": "nope"}).status_code == 404


def test_api_keys_guard_every_route_but_health(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, "--api-key", "k1", env={"HEARTH_API_KEYS": "k2,k3"})
    base = server.base_url
    # flags beat the environment: only k1 is accepted
    for path in ("/v1/models", "/models", "/version", "/runners", "/metrics"):
        response = httpx.get(base + path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert httpx.get(base + "/v1/models", headers={"x-api-key": "k1"}).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/readyz").status_code in (200, 503)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    reply = server.client(api_key="k1").chat.completions.create(model="model-a", messages=MESSAGES)
    assert reply.choices[0].message.content
    # a big unauthenticated body is refused before it is read
    response = httpx.post(base + "/v1/chat/completions", content=b"x" * 1000)
    assert response.status_code == 401


def test_api_keys_from_environment(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, env={"HEARTH_API_KEYS": "k2, k3"})
    for key in ("k2", "k3"):
        assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401


def test_runner_started_by_hand_named_in_config(start_server, tmp_path: Path) -> None:
    port = free_port()
    runner = subprocess.Popen([sys.executable, "-m", "hearth.runner", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(runner.stdout.readline())["event"] == "listening"
        write_yaml(tmp_path, "remote", {"name": "remote-model", "backend": "fake", "runner": f"127.0.0.1:{port}"})
        write_yaml(tmp_path, "bad", {"name": "bad-address", "backend": "fake", "runner": "http://x/y"})
        server = start_server(tmp_path)
        reply = server.client().chat.completions.create(model="remote-model", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("Hello!")
        assert server.runners()[0]["pid"] is None
        assert server.http().post("/runners/unload", json={"model": "remote-model"}).json()["unloaded"] is True
        assert runner.poll() is None  # Hearth does not stop a runner it did not start
        with pytest.raises(openai.NotFoundError, match="runner must be host:port"):
            server.client().chat.completions.create(model="bad-address", messages=MESSAGES)
    finally:
        runner.terminate()
        runner.wait(10)


def test_a_runner_on_the_network_needs_the_shared_secret(start_server, tmp_path: Path) -> None:
    """A runner listening on TCP with HEARTH_RUNNER_SECRET refuses every call without it (the server names the
    cause); with the same secret the server uses it. On a network address it will not start without one."""
    refused = subprocess.run([sys.executable, "-m", "hearth.runner", "--listen", f"0.0.0.0:{free_port()}"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "HEARTH_RUNNER_SECRET": ""})
    assert refused.returncode == 2 and "HEARTH_RUNNER_SECRET" in refused.stderr, refused.stderr
    port = free_port()
    runner = subprocess.Popen([sys.executable, "-m", "hearth.runner", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "HEARTH_RUNNER_SECRET": "s3cret"})
    try:
        assert json.loads(runner.stdout.readline())["event"] == "listening"
        write_yaml(tmp_path, "remote", {"name": "remote-model", "backend": "fake", "runner": f"127.0.0.1:{port}"})
        outsider = start_server(tmp_path, env={"HEARTH_RUNNER_SECRET": "guess"})
        with pytest.raises(openai.InternalServerError, match="wrong or missing runner secret"):
            outsider.client().chat.completions.create(model="remote-model", messages=MESSAGES)
        outsider.stop()
        member = start_server(tmp_path, env={"HEARTH_RUNNER_SECRET": "s3cret"})
        reply = member.client().chat.completions.create(model="remote-model", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("Hello!")
    finally:
        runner.terminate()
        runner.wait(10)


def test_runner_started_as_a_session_leader_starts() -> None:
    """A runner given a parent (as the server starts it) leaves the parent's process group; started as a session
    leader (setsid, or an older server's start_new_session) it already leads its own group and must start anyway."""
    port = free_port()
    runner = subprocess.Popen([sys.executable, "-m", "hearth.runner", "--listen", f"127.0.0.1:{port}",
                               "--parent-pid", str(os.getpid())], start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(runner.stdout.readline())["event"] == "listening"
        assert os.getpgid(runner.pid) == runner.pid
    finally:
        runner.terminate()
        runner.wait(10)


def test_runner_killed_while_loading_is_a_clear_load_failure(start_server, models_dir: Path) -> None:
    server = start_server(models_dir)
    errors: list[Exception] = []

    def ask() -> None:
        try:
            server.client().chat.completions.create(model="slow-load", messages=MESSAGES)
        except openai.InternalServerError as exc:
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    # wait until the runner is inside Load (the fake sleeps 1.5 s there), then kill it
    assert wait_for(lambda: "loading model 'slow-load'" in server.log())
    os.kill(server.runner_pid("slow-load"), signal.SIGKILL)
    thread.join(30)
    (error,) = errors
    assert error.body["code"] == "model_load_failed"
    assert "killed by signal SIGKILL" in error.message and "out of memory" in error.message
    assert server.client().chat.completions.create(model="slow-load", messages=MESSAGES).choices


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_grpc_uses_its_polling_transport_in_both_processes(start_server, models_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The server and its runners switch off gRPC's EventEngine client and listener (see hearth/__init__.py); if a
    gRPC upgrade drops those experiments, gRPC logs "Unknown experiment" and this fails, so the choice gets
    looked at again instead of silently lapsing."""
    import hearth

    monkeypatch.delenv("GRPC_EXPERIMENTS")  # set in this process too, by importing hearth: the server must set it
    server = start_server(models_dir)
    chunks = list(server.client().chat.completions.create(model="model-a", messages=MESSAGES, stream=True))
    assert chunks
    assert _environ(server.runner_pid("model-a"))["GRPC_EXPERIMENTS"] == hearth.GRPC_EXPERIMENTS
    server.stop()
    assert "experiment" not in server.log_path.read_text(errors="replace").lower()


def test_grpc_experiments_from_the_environment_are_kept(start_server, models_dir: Path) -> None:
    server = start_server(models_dir, env={"GRPC_EXPERIMENTS": "-event_engine_client"})
    server.client().chat.completions.create(model="model-a", messages=MESSAGES)
    assert _environ(server.runner_pid("model-a"))["GRPC_EXPERIMENTS"] == "-event_engine_client"
