"""The Ray actor that keeps one runner on a node of a Ray cluster (see hearth/runtime/cluster.py for the API side).

The actor starts the same runner process a local server starts (`python -m hearth.runner`), listening with gRPC on
the node's cluster address at a port the system chooses, guarded by the cluster's shared secret. The API processes
that use it hold leases: each renews its lease while it keeps the model loaded, and releases it when it unloads the
model. When the last lease ends (released, or not renewed in time because that API process died), the actor stops
the runner and exits, so a cluster never keeps a model nobody serves. The runner exits with the actor (it watches
its parent), and the actor with its node.

A node that cannot read the model's files installs them from the model's gallery entry (`install`), through its own
sha256-keyed cache, while the API process reads the download's progress (`progress`) into a job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hearth.runtime.process import runner_environment

LISTEN_TIMEOUT = 60.0  # seconds for the runner to start listening


class RunnerHost:
    """A runner process on this node, kept while some API process holds a lease on it."""

    def __init__(self, model: str, secret: str, log_level: str = "info", lease_seconds: float = 30.0) -> None:
        import ray

        self.model = model
        self.node_id = ray.get_runtime_context().get_node_id()
        # The address the node joined the cluster with (`ray start --node-ip-address`), not just any of the host's.
        self.node_ip = next((node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == self.node_id),
                            ray.util.get_node_ip_address())
        self.lease_seconds = lease_seconds
        self.leases: dict[str, float] = {}  # holder -> when its lease ends
        self.held_once = False
        from hearth.gallery.download import Transfer

        self.transfer = Transfer()  # an install on this node: its progress
        self.started = time.monotonic()
        self.lock = threading.Lock()
        env = runner_environment(os.environ)
        env["HEARTH_RUNNER_SECRET"] = secret
        env.setdefault("HEARTH_LOG_LEVEL", log_level)
        # The node's cluster address, never every interface; port 0: the runner announces the port it got.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hearth.runner", "--listen", f"{self.node_ip}:0", "--parent-pid", str(os.getpid()),
             "--log-level", log_level, "--name", model],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, env=env, text=True)
        self.address = self._announced_address()
        threading.Thread(target=self._drain, name="runner-stdout", daemon=True).start()
        threading.Thread(target=self._expire, name="lease-watch", daemon=True).start()

    def _announced_address(self) -> str:
        assert self.process.stdout is not None
        found: dict[str, str] = {}

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith('{"event"'):
                    event = json.loads(line)
                    if event.get("event") == "listening":
                        found["address"] = event["address"]
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(LISTEN_TIMEOUT)
        if "address" not in found:
            self.process.kill()
            raise RuntimeError(f"the runner for '{self.model}' on node {self.node_ip} did not start listening "
                               f"(exit code {self.process.poll()})")
        return found["address"]

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:  # the runner's stdout carries only its start-up event; keep the pipe empty
            pass

    def _expire(self) -> None:
        """Stop when the runner dies or the last lease runs out."""
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.lock:
                self.leases = {h: end for h, end in self.leases.items() if end > now}
                # (an API process that made this actor and died before taking its lease leaves it unheld)
                done = not self.leases and (self.held_once or now - self.started > 2 * self.lease_seconds)
            if self.process.poll() is not None or done:
                import ray

                # The actor ends with its runner, through a call to itself (only an actor's call may end it cleanly).
                ray.get_runtime_context().current_actor.shutdown.remote()
                return

    def _stop_runner(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    # -- what the API processes call -------------------------------------------------------------------

    def attach(self, holder: str) -> dict[str, Any]:
        """Take or renew `holder`'s lease; where the runner listens, and on which node."""
        with self.lock:
            self.leases[holder] = time.monotonic() + self.lease_seconds
            self.held_once = True
        return {"address": self.address, "node_ip": self.node_ip, "node_id": self.node_id, "pid": self.process.pid,
                "alive": self.process.poll() is None}

    def release(self, holder: str) -> int:
        """End `holder`'s lease; the last one stops the runner and this actor."""
        with self.lock:
            self.leases.pop(holder, None)
            left = len(self.leases)
        if not left:
            self.shutdown()
        return left

    def shutdown(self) -> None:
        """Stop the runner, then this actor."""
        import ray

        self._stop_runner()
        ray.actor.exit_actor()

    def missing_files(self, paths: list[str]) -> list[str]:
        """Which of the model's files this node cannot read."""
        return [path for path in paths if not Path(path).is_file() and not Path(path).is_dir()]

    def install(self, wanted: str, name: str, settings_json: str) -> list[str]:
        """Install gallery entry `wanted` as model `name` into this node's models directory (the API's settings:
        the same directory path, galleries and download rules), as `hearth models install` does; its notes."""
        import asyncio

        from hearth.gallery.catalog import Catalog
        from hearth.gallery.install import install_entry
        from hearth.settings import Settings

        settings = Settings.model_validate_json(settings_json)
        catalog = Catalog(settings)
        found = asyncio.run(catalog.listing()).find(wanted)
        if found is None or found.entry is None:
            raise RuntimeError(f"no gallery entry '{wanted}' on this node's galleries")
        notes: list[str] = []
        asyncio.run(install_entry(found.entry, settings.models_dir, settings.cache_dir, catalog.sources, name=name,
                                  transfer=self.transfer, catalog=catalog, notes=notes))
        return notes

    def progress(self) -> dict[str, Any]:
        """The running install's download: bytes done and in all, and the file."""
        return {"done": self.transfer.done, "total": self.transfer.total, "stage": self.transfer.stage}


class ClusterSecret:
    """One secret for the cluster's runners, made when the first API process connects and read by the others."""

    def __init__(self) -> None:
        import secrets

        self.value = secrets.token_urlsafe(32)

    def get(self) -> str:
        return self.value
