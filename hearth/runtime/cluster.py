"""Runners on a Ray cluster (`hearth serve --ray ADDRESS`): the API process's side.

Each replica of a model is a named, detached Ray actor (hearth/runtime/ray_host.py) in the `hearth` namespace, named
`MODEL/REPLICA`, asking the scheduler for the model's resources: `threads` CPUs, memory (the YAML's `memory_mb`, or
an estimate from its files), the YAML's custom `resources`, and nodes with its `node` labels. The actor starts the
same runner a local server starts, on its node's cluster address, and the manager talks gRPC to it as to any runner,
so the LRU, idle unload, crash handling and every API stay as they are.

Being named and detached, runners are the cluster's, not this process's: another API process asking for the same
model finds the same actors. Each API process holds a lease on the runners it uses, renewed while it keeps them
loaded; a runner whose last lease ends stops. The gRPC secret is the server's `runner_secret` when set, otherwise one
the cluster makes once and hands to every API process that connects (ClusterSecret).

Ray is an extra (`pip install 'hearth[ray]'`); without `--ray` nothing here is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from hearth.config.schema import ModelConfig
from hearth.errors import ModelLoadFailed
from hearth.gallery.install import manifest_path
from hearth.gallery.jobs import Jobs
from hearth.settings import Settings

log = logging.getLogger("hearth.runtime")

NAMESPACE = "hearth"
MIB = 1024 * 1024


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SystemExit("hearth: --ray needs Ray; install it with: pip install 'hearth[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse to start with a cluster address nothing answers at (ray.init would retry for minutes); `auto` is
    Ray's to find."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"hearth: cannot reach the Ray cluster at {address} ({exc}); give the head's HOST:PORT "
                         f"(6379 by default) or 'auto' on a node of the cluster") from None


def estimated_memory(config: ModelConfig) -> int:
    """Bytes a replica asks the scheduler for: `memory_mb`, else its files plus a quarter for the context and
    buffers, plus 256 MiB for the runner itself."""
    if config.memory_mb:
        return config.memory_mb * MIB
    size = 0
    for path in config.file_paths:
        item = Path(path)
        with contextlib.suppress(OSError):
            size += item.stat().st_size if item.is_file() else sum(f.stat().st_size for f in item.rglob("*")
                                                                   if f.is_file())
    return int(size * 1.25) + 256 * MIB


def _shown(ask: dict[str, float]) -> str:
    return ", ".join(f"{value / MIB:.0f} MiB memory" if key == "memory" else f"{value:g} {key}"
                     for key, value in ask.items())


class RayCluster:
    """This API process's connection to the cluster, and the leases it holds on runners there."""

    def __init__(self, settings: Settings, jobs: Jobs) -> None:
        self.settings = settings
        self.jobs = jobs  # where installs on nodes show their progress
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.secret = settings.runner_secret
        self.held: set[RayRunner] = set()
        self._renewer: asyncio.Task | None = None

    def connect(self) -> None:
        """Join the cluster (at start-up, in the main thread, as Ray wants) and learn the runners' secret."""
        ray = _ray()
        address = self.settings.ray_address
        # ray.init takes SIGTERM and SIGINT for itself (exiting at once); the server's own handlers drain first.
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SystemExit(f"hearth: cannot join the Ray cluster at {address}: {exc}") from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if not self.secret:
            from hearth.runtime.ray_host import ClusterSecret

            keeper = ray.remote(ClusterSecret).options(name="cluster-secret", lifetime="detached",
                                                       get_if_exists=True, num_cpus=0).remote()
            self.secret = ray.get(keeper.get.remote(), timeout=120)
        log.info("runners go to the Ray cluster at %s (%d nodes)", address,
                 sum(1 for node in ray.nodes() if node.get("Alive")))

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ray_lease_seconds / 3)
            # All at once, so that runners that cannot be reached (the manager's to find) delay no other's renewal.
            await asyncio.gather(*(runner.attach(timeout=self.settings.ray_lease_seconds / 3)
                                   for runner in list(self.held)), return_exceptions=True)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    def default_threads(self) -> int:
        """Threads (and CPUs asked) for a model whose YAML sets none: the largest live node's CPUs, at most
        `--threads` (whose default, this machine's cores, says nothing about the nodes')."""
        largest = max((int(node.get("Resources", {}).get("CPU", 0)) for node in _ray().nodes() if node.get("Alive")),
                      default=1)
        return max(1, min(largest, self.settings.threads))

    def ask(self, config: ModelConfig, threads: int) -> dict[str, float]:
        return {"CPU": float(threads), "memory": float(estimated_memory(config)), **config.resources}

    def check_fits(self, config: ModelConfig, ask: dict[str, float]) -> None:
        """Refuse a model no live node could ever hold, naming what it asks for and what the nodes have."""
        nodes = [node for node in _ray().nodes() if node.get("Alive")]
        for node in nodes:
            have = node.get("Resources", {})
            labels = node.get("Labels", {}) or {}
            if all(have.get(key, 0) >= value for key, value in ask.items()) and \
                    all(labels.get(key) == value for key, value in config.node.items()):
                return
        where = f" on a node labelled {config.node}" if config.node else ""
        nodes_have = "; ".join(f"{node.get('NodeManagerAddress')}: {_shown({k: v for k, v in node['Resources'].items() if k == 'CPU' or k == 'memory' or k in config.resources})}"
                               for node in nodes) or "no live nodes"
        raise ModelLoadFailed(f"model '{config.name}' asks for {_shown(ask)}{where}, which no node of the Ray "
                              f"cluster has (nodes: {nodes_have})")


class RayRunner:
    """One replica's runner on the cluster: found by name or placed there; the manager's process for it."""

    def __init__(self, config: ModelConfig, replica: int, cluster: RayCluster, threads: int | None,
                 log_level: str) -> None:
        self.name = config.name
        self.config = config
        self.replica = replica
        self.cluster = cluster
        self.threads = threads or 0  # unset: the largest node's CPUs, at most --threads (see start)
        self.log_level = log_level
        self.actor_name = f"{config.name}/{replica}"
        self.handle: Any = None
        self.address = ""
        self.node_ip = ""
        self.node_id = ""
        self.pid: int | None = None
        self.returncode: int | None = None
        self.recent_lines: deque[str] = deque(maxlen=1)
        self.secret = cluster.secret

    async def start(self, timeout: float) -> None:
        ray = _ray()
        if not self.threads:
            self.threads = await asyncio.to_thread(self.cluster.default_threads)
        ask = await asyncio.to_thread(self.cluster.ask, self.config, self.threads)  # (it reads the files' sizes)
        await asyncio.to_thread(self.cluster.check_fits, self.config, ask)
        from hearth.runtime.ray_host import RunnerHost

        options: dict[str, Any] = {
            "name": self.actor_name, "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
            "num_cpus": ask["CPU"], "memory": ask["memory"], "resources": dict(self.config.resources),
            "max_restarts": 0,  # a replica that dies is replaced by the manager on the next request
            "max_concurrency": 4,  # its install's progress is read while the install runs
        }
        if self.config.node:
            options["label_selector"] = dict(self.config.node)
        found: dict[str, Any] | None = None
        try:  # a replica another API process placed (or this one, before it restarted)
            self.handle = await asyncio.to_thread(ray.get_actor, self.actor_name, namespace=NAMESPACE)
        except ValueError:
            self.handle = None
        if self.handle is not None:
            try:
                found = await self.attach(timeout=10.0)
            except Exception as exc:  # its node died and Ray does not know yet, say: place a new one
                log.info("replica %s could not be reached (%s); placing it again", self.actor_name, exc)
                self.kill()
                self.returncode = None
        if found is None:
            self.handle = await asyncio.to_thread(self._place, RunnerHost, options)
            try:
                found = await self.attach(timeout=timeout)
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"the Ray cluster placed no replica of '{self.name}' within {timeout:.0f} s: "
                                   f"its nodes are busy (it asks for {_shown(ask)})") from None
            except Exception as exc:
                self.kill()
                raise RuntimeError(f"replica {self.actor_name} did not start on the Ray cluster: {exc}") from None
        missing = await self._call("missing_files", self.config.file_paths, timeout=30)
        if missing:
            try:
                await self._install_on_node(missing)
            except BaseException:
                await self.stop()
                raise
        log.info("replica %s of '%s' runs on node %s (runner %s, pid %s)", self.replica, self.name, self.node_ip,
                 self.address, found.get("pid"))

    def _place(self, host: type, options: dict[str, Any]) -> Any:
        """The replica's actor, created (or found, if another API process just made it)."""
        try:
            return _ray().remote(host).options(**options).remote(self.name, self.secret, self.log_level,
                                                                 self.cluster.settings.ray_lease_seconds)
        except ValueError as exc:  # Ray's own checks of what the YAML asks (a label selector's syntax, say)
            raise RuntimeError(f"Ray refuses what the model's YAML asks for: {exc}") from None

    async def _install_on_node(self, missing: list[str]) -> None:
        """Install the model on this replica's node the way it was installed here (its gallery entry, through the
        node's sha256-keyed cache), with the download's progress in a job of the job API."""
        record: dict[str, Any] = {}
        if self.config.source_file:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(manifest_path(Path(self.config.source_file)).read_text(encoding="utf-8"))
        if not record.get("entry"):
            raise RuntimeError(f"node {self.node_ip} cannot read the model's files ({', '.join(missing)}), and the "
                               f"model was not installed from a gallery, so it cannot be installed there: give every "
                               f"node the same models directory")
        wanted = f"{record['gallery']}@{record['entry']}" if record.get("gallery") else record["entry"]
        job = self.cluster.jobs.add(f"{self.name} on node {self.node_ip}")
        job.state = "downloading"
        log.info("installing '%s' (%s) on node %s for replica %d (job %s)", self.name, wanted, self.node_ip,
                 self.replica, job.id)
        settings = self.cluster.settings.model_dump_json(exclude={"api_keys", "admin_api_key", "runner_secret"})
        ref = self.handle.install.remote(wanted, record.get("name") or self.name, settings)
        done = asyncio.wrap_future(ref.future())
        while True:
            finished = done.done()
            with contextlib.suppress(Exception):
                progress = await self._call("progress", timeout=10)
                job.transfer.done, job.transfer.total = progress["done"], progress["total"]
                job.transfer.stage = progress["stage"]
            if finished:  # (read once more after the end: a quick download may finish between two readings)
                break
            await asyncio.wait({done}, timeout=0.5)
        try:
            job.notes = list(done.result())
        except Exception as exc:
            job.state, job.error = "failed", str(exc).strip().splitlines()[-1][:500]
            raise RuntimeError(f"installing '{self.name}' on node {self.node_ip} failed: {job.error}") from None
        job.state = "done"

    async def _call(self, method: str, *args: Any, timeout: float) -> Any:
        ref = getattr(self.handle, method).remote(*args)
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)

    async def attach(self, timeout: float) -> dict[str, Any]:
        found = await self._call("attach", self.cluster.holder, timeout=timeout)
        self.address, self.node_ip, self.node_id = found["address"], found["node_ip"], found["node_id"]
        self.pid = found["pid"]
        self.cluster.held.add(self)
        return found

    def exit_description(self) -> str:
        return f"replica {self.replica} on Ray node {self.node_ip or '?'} is gone"

    def last_words(self) -> str:
        return ""

    async def wait_exit(self, timeout: float) -> bool:
        """Whether the replica is gone: its actor cannot be reached (its node died, or it was stopped)."""
        if self.returncode is not None:
            return True
        try:
            found = await self._call("attach", self.cluster.holder, timeout=min(timeout, 5.0))
            if found.get("alive"):
                return False
        except Exception:
            pass
        self.returncode = -1
        return True

    def kill(self) -> None:
        self.cluster.held.discard(self)
        if self.handle is not None:
            with contextlib.suppress(Exception):
                _ray().kill(self.handle, no_restart=True)
        self.returncode = -9

    async def stop(self, grace: float = 5.0) -> None:
        """Give up this process's lease; the replica stops when no other API process holds one."""
        self.cluster.held.discard(self)
        if self.handle is not None and self.returncode is None:
            with contextlib.suppress(Exception):
                await self._call("release", self.cluster.holder, timeout=grace)
        self.returncode = self.returncode if self.returncode is not None else 0
