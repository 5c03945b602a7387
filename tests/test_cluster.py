"""Runners on a real Ray cluster of three nodes on this machine (`hearth serve --ray`).

The cluster is three `ray start` processes, each a node with one CPU, its own temp dir, memory and custom
resources: the head (`head`), and workers `b` (label zone=b, resource `worker`) and `c` (resource `special` and
`worker`). Each node runs in a session of its own, so a test can kill one whole node at once. Ray will not put a
multi-node cluster on loopback (it replaces 127.0.0.1 with the host's own address), so the nodes are on this
machine's address; their traffic still never leaves the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from hearth.errors import ModelLoadFailed
from hearth.runtime.client import RunnerClient
from tests.conftest import HearthServer, free_port, install_cached, write_yaml
from tests.standin import StandIn

RAY = str(Path(sys.executable).parent / "ray")
GIB = 1024**3
SMOL = "smollm2-135m-instruct-q8_0.gguf"
# Ray notices a dead node after its health checks fail: checked every 0.5 s here, dead after 4 failures.
RAY_ENV = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
           "RAY_health_check_failure_threshold": "4", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)

    def kill(self) -> None:
        """The whole node at once: its raylet, workers and the runners they started (one session)."""
        subprocess.run(["pkill", "-KILL", "-s", str(self.process.pid)], check=False)
        self.process.wait(10)


@dataclass
class Cluster:
    address: str
    root: Path
    nodes: dict[str, Node]
    host: str = ""  # the address the nodes joined with: this machine's own

    def actor_exists(self, name: str) -> bool:
        script = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
                  f"try:\n    ray.get_actor({name!r}, namespace='hearth'); print('ACTOR yes')\n"
                  "except ValueError:\n    print('ACTOR no')")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **RAY_ENV}, check=True).stdout
        return _marked(out, "ACTOR ") == "yes"

    def node_ids(self) -> dict[str, str]:
        """Each live node's id, by the node's name here (read from its custom resource)."""
        script = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                  "print('NODES', json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **RAY_ENV}, check=True).stdout
        found = {}
        for node_id, resources in json.loads(_marked(out, "NODES ")):
            self.host = next((key[5:] for key in resources if key.startswith("node:") and key[5].isdigit()),
                             self.host)
            for name in self.nodes:
                if resources.get(f"node_{name}"):
                    found[name] = node_id
        return found


def _start_node(name: str, root: Path, port: int, *, head: bool, resources: dict[str, float],
                labels: dict[str, str] | None = None, hidden: tuple[Path, ...] = ()) -> Node:
    """A node; with `hidden`, in a mount namespace of its own where those folders are empty (a machine of its own,
    as far as they go)."""
    log = (root / f"{name}.log").open("w")
    argv = [RAY, "start", "--block", "--num-cpus=1", f"--memory={GIB}",
            f"--resources={json.dumps({f'node_{name}': 1, **resources})}", "--disable-usage-stats"]
    if labels:
        argv.append(f"--labels={','.join(f'{k}={v}' for k, v in labels.items())}")
    if head:
        argv += ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root / 'head'}"]
    else:
        argv += [f"--address=127.0.0.1:{port}"]
    if hidden:
        masks = " && ".join(f"mount -t tmpfs tmpfs {folder}" for folder in hidden)
        user = ["--user", "--map-root-user"] if os.geteuid() else []  # not root: mounts in a user namespace
        argv = ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c", f'{masks} && exec "$0" "$@"',
                *argv]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **RAY_ENV})
    return Node(name, process, resources, labels or {})


def _marked(output: str, marker: str) -> str:
    """The script's answer: its line that starts with `marker` (Ray's driver prints lines of its own, as a worker
    of a node killed earlier is reported)."""
    return next(line[len(marker):] for line in output.splitlines() if line.startswith(marker))


def _wait_started(node: Node, root: Path) -> None:
    log = root / f"{node.name}.log"
    deadline = time.monotonic() + 90
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert node.process.poll() is None and time.monotonic() < deadline, \
            f"Ray node {node.name} did not start:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    nodes = {"head": _start_node("head", root, port, head=True, resources={})}
    made = Cluster(f"127.0.0.1:{port}", root, nodes)
    try:
        # One node after another: two raylets starting at once on one machine may pick the same free port.
        _wait_started(nodes["head"], root)
        nodes["b"] = _start_node("b", root, port, head=False, resources={"worker": 1}, labels={"zone": "b"})
        _wait_started(nodes["b"], root)
        nodes["c"] = _start_node("c", root, port, head=False, resources={"worker": 1, "special": 1})
        _wait_started(nodes["c"], root)
        deadline = time.monotonic() + 60
        while len(made.node_ids()) < 3:
            assert time.monotonic() < deadline, "the Ray cluster did not come up:\n" + "\n".join(
                (root / f"{n}.log").read_text(errors="replace")[-2000:] for n in nodes)
            time.sleep(1)
        yield made
    finally:
        for node in nodes.values():
            if node.process.poll() is None:
                node.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_models(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path) -> Path:
    """A models directory every node reads (they share this machine's file system)."""
    models = tmp_path_factory.mktemp("cluster-models")
    install_cached(models, smollm2_file, SMOL)
    write_yaml(models, "smol", {"name": "smol", "backend": "llama-cpp", "parameters": {"model": SMOL},
                                "threads": 1, "context_size": 2048, "replicas": 2})
    write_yaml(models, "special", {"name": "special", "backend": "fake", "threads": 1, "memory_mb": 64,
                                   "resources": {"special": 1}})
    write_yaml(models, "zoned", {"name": "zoned", "backend": "fake", "threads": 1, "memory_mb": 64,
                                 "node": {"zone": "b"}})
    write_yaml(models, "unsized", {"name": "unsized", "backend": "fake", "memory_mb": 64})
    write_yaml(models, "elastic", {"name": "elastic", "backend": "fake", "threads": 1, "memory_mb": 64,
                                   "max_replicas": 2, "fake": {"token_delay": 0.05, "reply": " ".join(["word"] * 60)}})
    write_yaml(models, "too-big", {"name": "too-big", "backend": "fake", "threads": 1, "memory_mb": 100_000})
    write_yaml(models, "slow", {"name": "slow", "backend": "llama-cpp", "parameters": {"model": SMOL}, "threads": 1,
                                "context_size": 2048, "parallel": 4, "resources": {"worker": 1}})
    return models


def _serve(models: Path, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, **env: str) -> HearthServer:
    log_path = tmp_path_factory.mktemp("log") / "hearth.log"
    return HearthServer(models, log_path, "--ray", cluster.address, env={**RAY_ENV, "HEARTH_RAY_LEASE_SECONDS": "3",
                                                                      "HEARTH_RAY_SCALE_DOWN_SECONDS": "2", **env},
                        ready_timeout=90)


@pytest.fixture(scope="module")
def api(cluster: Cluster, cluster_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    server = _serve(cluster_models, cluster, tmp_path_factory)
    yield server
    assert server.stop(60) == 0  # SIGTERM drains as without Ray (ray.init's own handler would exit at once)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def _chat(server: HearthServer, model: str, content: str = "hi", **body: object) -> httpx.Response:
    return server.http().post("/v1/chat/completions",
                              json={"model": model, "messages": [{"role": "user", "content": content}], **body})


def _unload(server: HearthServer, model: str) -> None:
    assert server.http().post("/runners/unload", json={"model": model}).status_code == 200


def _replicas(server: HearthServer, model: str) -> list[dict]:
    return sorted((r for r in server.runners() if r["name"] == model and r["state"] == "ready"),
                  key=lambda r: r["replica"])


def test_models_are_placed_by_their_resources_and_labels(api: HearthServer, cluster: Cluster) -> None:
    """A custom resource only node c has puts the model there; a node label puts another on node b; a model no
    node could hold is refused at once, naming what it asks for."""
    ids = cluster.node_ids()
    assert _chat(api, "special").status_code == 200
    assert _chat(api, "zoned").status_code == 200
    placed = {r["name"]: r for r in api.runners()}
    assert placed["special"]["node_id"] == ids["c"]
    assert placed["zoned"]["node_id"] == ids["b"]
    node = placed["special"]["node"]  # the node's cluster address, and the runner listens there, not everywhere
    assert node == cluster.host and placed["special"]["address"].startswith(f"{node}:")
    # No threads set: as many as the largest node has (1), though this server's --threads is 2.
    assert _chat(api, "unsized").status_code == 200
    _unload(api, "unsized")
    started = time.monotonic()
    refused = _chat(api, "too-big")
    assert time.monotonic() - started < 30
    assert refused.status_code == 500, refused.text
    message = refused.json()["error"]["message"]
    assert "too-big" in message and "1 CPU" in message and "100000 MiB memory" in message, message
    assert "no node" in message, message
    for model in ("special", "zoned"):
        _unload(api, model)


def test_a_runner_refuses_a_call_without_the_cluster_secret(api: HearthServer) -> None:
    assert _chat(api, "special").status_code == 200
    address = next(r for r in api.runners() if r["name"] == "special")["address"]

    async def knock(secret: str) -> None:
        client = RunnerClient(address, secret)
        try:
            await client.health()
        finally:
            await client.close()

    with pytest.raises(ModelLoadFailed, match="refused the connection"):
        asyncio.run(knock(""))
    with pytest.raises(ModelLoadFailed, match="refused the connection"):
        asyncio.run(knock("a guess"))
    _unload(api, "special")


def test_two_replicas_on_two_nodes_serve_eight_streams(api: HearthServer, cluster: Cluster) -> None:
    results: list[tuple[int, str]] = []

    def stream(index: int) -> None:
        text, status = "", 0
        with api.http().stream("POST", "/v1/chat/completions", json={
                "model": "smol", "stream": True, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count from {index} to {index + 10}."}]}) as reply:
            status = reply.status_code
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    text += (choices[0]["delta"].get("content") or "") if choices else ""
        results.append((status, text))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(results) == 8 and all(status == 200 and text.strip() for status, text in results), results
    replicas = _replicas(api, "smol")
    assert [r["replica"] for r in replicas] == [0, 1]
    assert replicas[0]["node_id"] != replicas[1]["node_id"]
    assert all(r["requests_served"] >= 2 for r in replicas), replicas  # both took their share
    shown = api.http().get("/runners/models").json()["models"]
    smol = next(m for m in shown if m["name"] == "smol")
    assert [r["replica"] for r in smol["replicas"]] == [0, 1] and smol["replicas"][0]["node"] == cluster.host
    _models_tab_shows_the_replicas(api, cluster.host)


def _models_tab_shows_the_replicas(api: HearthServer, host: str) -> None:
    """The web page's Models tab, in Chromium, lists each replica with its node and state."""
    from playwright.sync_api import expect, sync_playwright

    from tests.test_web import CHROMIUM, FLAGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(api.base_url + "/")
            page.click("#tab-models")
            lines = page.locator("#models-table tr[data-model=smol] .replica")
            expect(lines).to_have_count(2)
            expect(lines.nth(0)).to_have_text(f"replica 0 on {host}: idle")
            expect(lines.nth(1)).to_have_text(f"replica 1 on {host}: idle")
        finally:
            browser.close()


def test_a_conversation_returns_to_the_replica_that_holds_its_cache(api: HearthServer) -> None:
    """Conversation B starts while A's first turn keeps replica 0 busy, so B lands on replica 1. B's second turn,
    with both replicas idle, goes back to replica 1 (the least-loaded rule alone picks replica 0) and reads its
    first turn from the prompt cache."""
    assert _chat(api, "smol", max_tokens=1).status_code == 200  # both replicas loaded
    before = {r["replica"]: r["requests_served"] for r in _replicas(api, "smol")}
    busy = threading.Thread(target=lambda: _chat(api, "smol", "Write a long story about a lighthouse.",
                                                 max_tokens=200, temperature=0))
    busy.start()
    deadline = time.monotonic() + 30
    while not any(r["active_requests"] for r in _replicas(api, "smol")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r["active_requests"] for r in _replicas(api, "smol")] == [1, 0]  # A's first turn: on replica 0
    question = [{"role": "user", "content": "Name three colours of the rainbow, please, in one short sentence."}]
    first = api.http().post("/v1/chat/completions", json={"model": "smol", "messages": question, "max_tokens": 24,
                                                          "temperature": 0}).json()
    busy.join(120)
    served_first = {r["replica"]: r["requests_served"] for r in _replicas(api, "smol")}
    assert served_first[1] == before[1] + 1  # B's first turn: on replica 1, the idle one
    turn = [*question, first["choices"][0]["message"], {"role": "user", "content": "And two more?"}]
    second = api.http().post("/v1/chat/completions", json={"model": "smol", "messages": turn, "max_tokens": 8,
                                                           "temperature": 0}).json()
    served_second = {r["replica"]: r["requests_served"] for r in _replicas(api, "smol")}
    assert served_second[1] == served_first[1] + 1, (served_first, served_second)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"], (cached, first["usage"], second["usage"])
    _unload(api, "smol")


def test_a_model_scales_up_while_its_replicas_are_full_and_back_down_when_idle(api: HearthServer) -> None:
    """`max_replicas: 2` with one slot per replica: a second request at once places a second replica, which the
    next request finds; once idle it is stopped again."""
    done: list[int] = []

    def ask() -> None:
        done.append(_chat(api, "elastic").status_code)

    first = threading.Thread(target=ask)
    first.start()
    deadline = time.monotonic() + 30
    while not any(r["active_requests"] for r in _replicas(api, "elastic")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = threading.Thread(target=ask)  # replica 0's one slot is taken: a second replica is placed
    second.start()
    while len(_replicas(api, "elastic")) < 2:
        assert time.monotonic() < deadline, api.runners()
        time.sleep(0.1)
    assert _chat(api, "elastic").status_code == 200
    assert len(_replicas(api, "elastic")) == 2 and _replicas(api, "elastic")[1]["requests_served"] >= 1, api.runners()
    first.join(30)
    second.join(30)
    assert done == [200, 200]
    deadline = time.monotonic() + 30
    while len(_replicas(api, "elastic")) > 1:  # idle past HEARTH_RAY_SCALE_DOWN_SECONDS (2 here)
        assert time.monotonic() < deadline, api.runners()
        time.sleep(0.2)
    assert [r["replica"] for r in _replicas(api, "elastic")] == [0]
    _unload(api, "elastic")


def test_a_second_api_process_uses_the_same_runners(api: HearthServer, cluster: Cluster, cluster_models: Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    assert _chat(api, "special").status_code == 200
    other = _serve(cluster_models, cluster, tmp_path_factory)
    try:
        reply = _chat(other, "special")
        assert reply.status_code == 200, reply.text
        mine = next(r for r in api.runners() if r["name"] == "special")
        theirs = next(r for r in other.runners() if r["name"] == "special")
        assert (mine["address"], mine["pid"]) == (theirs["address"], theirs["pid"])
    finally:
        other.stop(60)
    # The other process gave up its lease; this one still holds the runner.
    assert _chat(api, "special").status_code == 200
    assert next(r for r in api.runners() if r["name"] == "special")["pid"] == mine["pid"]
    _unload(api, "special")  # the last lease given up: the runner and its actor stop
    _gone(cluster, "special/0", mine["pid"])


def _gone(cluster: Cluster, actor: str, pid: int) -> None:
    """The runner (its process on this machine) stops, and its actor with it."""
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"the runner of {actor} outlived its last lease"
        time.sleep(0.2)
    while cluster.actor_exists(actor):
        assert time.monotonic() < deadline, f"the actor {actor} outlived its runner"
        time.sleep(0.5)


def test_a_runner_whose_api_process_was_killed_stops_when_its_lease_lapses(
        cluster: Cluster, cluster_models: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = _serve(cluster_models, cluster, tmp_path_factory)
    try:
        assert _chat(other, "zoned").status_code == 200
        pid = next(r for r in other.runners() if r["name"] == "zoned")["pid"]
        other.process.kill()  # no unload, no release: only the lease (3 s here) ends it
        other.process.wait(10)
        time.sleep(1)
        assert Path(f"/proc/{pid}").exists()  # (not at once: the lease has not lapsed yet)
        _gone(cluster, "zoned/0", pid)
    finally:
        other.stop()


def test_a_node_without_the_model_installs_it_through_the_gallery(
        cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Node d sees its own, empty models directory and download cache: the runner placed there installs the model
    from its gallery entry (downloaded again, checked by sha256), with the download's progress in the job API."""
    payload = os.urandom(2 * 1024 * 1024 + 7)
    files = StandIn()
    files.files["/tiny.bin"] = payload
    models, cache = tmp_path_factory.mktemp("d-models"), tmp_path_factory.mktemp("d-cache")
    gallery = tmp_path_factory.mktemp("d-gallery") / "gallery.yaml"
    gallery.write_text(yaml.safe_dump([{"name": "tiny", "config": {"backend": "fake"}, "files": [
        {"filename": "tiny.bin", "uri": f"{files.base}/tiny.bin", "sha256": hashlib.sha256(payload).hexdigest()}]}]))
    node = _start_node("d", cluster.root, int(cluster.address.rsplit(":", 1)[1]), head=False,
                       resources={"isolated": 1}, hidden=(models, cache))
    cluster.nodes["d"] = node
    server = None
    try:
        _wait_started(node, cluster.root)
        server = _serve(models, cluster, tmp_path_factory, HEARTH_GALLERIES=str(gallery),
                        HEARTH_DOWNLOAD_ALLOW="127.0.0.1", HEARTH_CACHE_DIR=str(cache))
        status = server.install(id="gallery@tiny", overrides={"threads": 1, "memory_mb": 64,
                                                                "resources": {"isolated": 1}})
        assert status["state"] == "done", status
        reply = _chat(server, "tiny")
        assert reply.status_code == 200, reply.text
        assert files.hits["/tiny.bin"] == 2  # here, then on node d, whose cache was empty
        jobs = [j for j in server.http().get("/models/jobs").json() if j["name"].startswith("tiny on node")]
        assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["progress"] == 100.0, jobs
        assert jobs[0]["total_bytes"] == len(payload)
        assert next(r for r in server.runners() if r["name"] == "tiny")["node_id"] == cluster.node_ids()["d"]
    finally:
        if server is not None:
            server.stop(60)
        node.kill()
        del cluster.nodes["d"]
        files.close()


def test_a_node_that_dies_mid_stream_ends_its_streams_and_the_model_is_placed_again(
        api: HearthServer, cluster: Cluster) -> None:
    """Runs last: it kills a worker node. Its streams end with an error event (never a hang or a cut
    connection), and the next request is served by a replacement on the surviving worker."""
    assert _chat(api, "slow", max_tokens=1).status_code == 200
    ids = cluster.node_ids()
    where = next(r for r in api.runners() if r["name"] == "slow")["node_id"]
    victim = next(name for name, node_id in ids.items() if node_id == where)
    assert victim in ("b", "c")
    lines: dict[int, list[str]] = {}
    begun = threading.Event()

    def stream(index: int) -> None:
        got: list[str] = []
        try:
            with api.http(timeout=60).stream("POST", "/v1/chat/completions", json={
                    "model": "slow", "stream": True, "max_tokens": 1800, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Tell me a story."}]}) as reply:
                got.append(str(reply.status_code))
                for line in reply.iter_lines():
                    if line:
                        got.append(line)
                        begun.set()
        except httpx.HTTPError as exc:
            got.append(f"broken: {exc!r}")
        lines[index] = got

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    assert begun.wait(30)
    time.sleep(0.5)
    started = time.monotonic()
    cluster.nodes[victim].kill()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < 45
    for got in lines.values():
        assert got[0] == "200" and not any(line.startswith("broken") for line in got), got[-3:]
        assert got[-1] == "data: [DONE]" and '"error"' in got[-2], got[-3:]
        assert "slow" in got[-2], got[-2]
    deadline = time.monotonic() + 90
    while True:
        reply = _chat(api, "slow", max_tokens=1)
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert reply.status_code == 200, reply.text
    survivor = "c" if victim == "b" else "b"
    assert next(r for r in api.runners() if r["name"] == "slow")["node_id"] == ids[survivor]


def test_an_unreachable_cluster_is_a_clear_error_at_start(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "hearth", "serve", "--models-dir", str(tmp_path), "--port",
                             str(free_port()), "--ray", address], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot reach the Ray cluster at {address}" in result.stderr and "Traceback" not in result.stderr
