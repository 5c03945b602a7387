"""Which runner serves a model: start on first use, reuse, evict (LRU and idle), restart after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.config.schema import ModelConfig
from hearth.cores import SLOTS, Board
from hearth.errors import BackendError, HearthError, ModelLoadFailed, RunnerCrashed
from hearth.gallery.jobs import Jobs
from hearth.metrics import Metrics
from hearth.runner import hearth_pb2 as pb
from hearth.runtime.client import RunnerClient, RunnerGone
from hearth.runtime.cluster import RayCluster, RayRunner
from hearth.runtime.process import RemoteRunner, RunnerProcess
from hearth.runtime.replicas import affinity_parts, choose, runner_key, slots
from hearth.settings import Settings

log = logging.getLogger("hearth.runtime")


@dataclass
class Runner:
    """One loaded (or loading) model and the process that holds it."""

    name: str
    config: ModelConfig
    process: RunnerProcess | RemoteRunner | RayRunner
    replica: int = 0  # which copy of the model (on a Ray cluster, `replicas: N` runs N)
    client: RunnerClient | None = None
    info: pb.ModelInfo | None = None
    state: str = "loading"  # loading | ready | stopping | dead
    active: int = 0
    served: int = 0  # requests it was given
    working: int = 0  # requests in flight that compute (not tokenize calls), for the board of busy runners
    slot: int | None = None  # this runner's byte on the board, for runners this server started
    metrics: Metrics | None = None  # the server's, counting what this runner generates and whether it crashes
    loaded_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None  # seconds idle before unloading (Ollama's keep_alive); None: the server setting
    started_wall: float = field(default_factory=time.time)
    stuck: str = ""  # why the watchdog killed it, when it did
    # The prompts this replica served lately, as their parts (messages): its prompt cache likely holds them.
    recent: deque[tuple[tuple[int, int], ...]] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def key(self) -> str:
        """Its name in the manager's table: the model's name, with `#N` for replicas after the first."""
        return runner_key(self.name, self.replica)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and self.state == "ready"

    async def crash_error(self, what: str = "serving this request") -> HearthError:
        """Why the connection broke: a dead process becomes RunnerCrashed, anything else a backend error."""
        exited = await self.process.wait_exit(2.0)
        if exited:
            if self.state != "dead" and self.metrics is not None:
                self.metrics.inc("hearth_runner_crashes_total", model=self.name)
            self.state = "dead"
            if self.stuck:
                return RunnerCrashed(f"the runner for model '{self.name}' {self.stuck} while {what}; it was stopped "
                                     f"and will be restarted on the next request")
            return RunnerCrashed(
                f"the runner for model '{self.name}' stopped ({self.process.exit_description()}) while {what}; "
                f"it will be restarted on the next request")
        return BackendError(f"lost the connection to the runner for model '{self.name}'")

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateReply]:
        assert self.client is not None
        try:
            async for reply in self.client.generate(request):
                if reply.finish_reason and self.metrics is not None:
                    self._count(reply)
                yield reply
        except RunnerGone:
            raise await self.crash_error() from None

    def _count(self, reply: pb.GenerateReply) -> None:
        metrics, model = self.metrics, self.name
        assert metrics is not None
        metrics.inc("hearth_generations_total", model=model, finish_reason=reply.finish_reason)
        metrics.inc("hearth_prompt_tokens_total", reply.usage.prompt_tokens, model=model)
        metrics.inc("hearth_prompt_cached_tokens_total", reply.usage.cached_tokens, model=model)
        metrics.inc("hearth_completion_tokens_total", reply.usage.completion_tokens, model=model)
        metrics.inc("hearth_prompt_seconds_total", reply.timings.prompt_ms / 1000, model=model)
        metrics.inc("hearth_generation_seconds_total", reply.timings.predicted_ms / 1000, model=model)
        if reply.timings.draft_n:
            metrics.inc("hearth_draft_tokens_total", reply.timings.draft_n, model=model)
            metrics.inc("hearth_draft_tokens_accepted_total", reply.timings.draft_n_accepted, model=model)

    async def stream(self, method: str, request: Any) -> AsyncIterator[Any]:
        """A streaming RPC other than generate (transcribe, speak) with crash handling."""
        assert self.client is not None
        try:
            async for reply in getattr(self.client, method)(request):
                yield reply
        except RunnerGone:
            raise await self.crash_error() from None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A unary RPC (tokenize, detokenize, …) with crash handling."""
        assert self.client is not None
        try:
            return await getattr(self.client, method)(*args, **kwargs)
        except RunnerGone:
            raise await self.crash_error() from None

    def status(self) -> dict[str, Any]:
        info = self.info
        return {
            "name": self.name,
            "backend": self.config.canonical_backend,
            "state": self.state,
            "replica": self.replica,
            **({"node": self.process.node_ip, "node_id": self.process.node_id, "address": self.process.address}
               if isinstance(self.process, RayRunner) else {"node": None}),  # on a Ray cluster: where it runs
            "pid": self.process.pid,
            "active_requests": self.active,
            "requests_served": self.served,
            "loaded_at": self.started_wall,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
            "context_size": info.context_size if info else None,
            "capabilities": list(info.capabilities) if info else [],
            "load_seconds": round(info.load_seconds, 3) if info else None,
        }


class RunnerManager:
    """Owns every runner process of the server."""

    def __init__(self, settings: Settings, jobs: Jobs | None = None) -> None:
        self.settings = settings
        self.runners: dict[str, Runner] = {}
        self.failures: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Models are loaded into this machine's memory one at a time: each load sizes itself by the memory available
        # (a llama.cpp runner reads weights in only when they take at most half of it), which two loads at once
        # would both count as theirs.
        self._loading = asyncio.Lock()
        self._loading_name = ""
        self._socket_dir: Path | None = None
        self._counter = 0
        self._reaper: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._closing = False
        self.board: Board | None = None
        self.metrics = Metrics()
        self._stopping_slots: set[int | None] = set()  # slots of runners still stopping: not yet free again
        self.cluster = RayCluster(settings, jobs or Jobs()) if settings.ray_address else None
        self._replacing: set[str] = set()  # replicas being placed again in the background
        self._tasks: set[asyncio.Task] = set()
        self._wanted: dict[str, int] = {}  # replicas each model on the cluster has now (scaled with max_replicas)

    async def start(self) -> None:
        self._socket_dir = Path(tempfile.mkdtemp(prefix="hearth-"))
        self._socket_dir.chmod(0o700)
        self.board = Board(self._socket_dir / "cores", create=True)
        self._reaper = asyncio.create_task(self._reap_idle())
        self._watchdog = asyncio.create_task(self._watch())
        if self.cluster is not None:
            self.cluster.connect()  # blocking, once, at start-up: Ray joins a cluster from the main thread
            await self.cluster.start()

    # -- using a model ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, config: ModelConfig, *, computes: bool = True, affinity: list[str] | None = None
                  ) -> AsyncIterator[Runner]:
        """The ready runner for `config`, loading it first if needed; held busy while the block runs.

        A block that `computes` (all but tokenizing) also marks the runner busy on the board, so that runners
        working at the same time share the cores (hearth/cores.py). Of several replicas, the request goes to the
        least busy, or to one that served a prompt sharing the longest start with `affinity` (the prompt's parts),
        whose prompt cache likely holds it."""
        runner = await self.ensure_loaded(config, affinity)
        runner.active += 1
        runner.served += 1
        if computes:
            runner.working += 1
            if runner.working == 1:
                self._mark(runner, True)
        try:
            yield runner
        finally:
            runner.active -= 1
            if computes:
                runner.working -= 1
                if runner.working == 0:
                    self._mark(runner, False)
            runner.last_used = time.monotonic()
            if runner.state == "dead":
                await self._forget(runner)

    def replicas(self, name: str) -> list[Runner]:
        return [runner for runner in self.runners.values() if runner.name == name]

    async def ensure_loaded(self, config: ModelConfig, affinity: list[str] | None = None) -> Runner:
        """A ready runner of the model; with replicas, all are loaded at first, and one that died is placed again
        in the background while the others serve. With `max_replicas`, one more is placed when every replica
        already has as many requests in flight as it has slots (the next would queue)."""
        clustered = self.cluster is not None and not config.runner
        copies = self._wanted.get(config.name, config.replicas) if clustered else 1
        ceiling = max(config.max_replicas or 0, config.replicas) if clustered else 1
        if copies == 1 and ceiling == 1:
            return await self._ensure_replica(config, 0)
        ready = [r for i in range(copies) if (r := self.runners.get(runner_key(config.name, i)))
                 and r.alive and r.config == config]
        if not ready:
            loaded = await asyncio.gather(*(self._ensure_replica(config, i) for i in range(copies)),
                                          return_exceptions=True)
            ready = [r for r in loaded if isinstance(r, Runner)]
            if not ready:
                raise next(r for r in loaded if isinstance(r, BaseException))
        if copies < ceiling and all(r.active >= slots(r) for r in ready):
            copies += 1
            log.info("scaling '%s' up to %d replicas: each of the %d ready has its slots taken", config.name, copies,
                     len(ready))
        self._wanted[config.name] = copies
        for replica in range(copies):
            key = runner_key(config.name, replica)
            runner = self.runners.get(key)
            if not (runner and runner.alive and runner.config == config) and key not in self._replacing:
                self._replacing.add(key)
                task = asyncio.get_running_loop().create_task(self._replace(config, replica))
                self._tasks.add(task)  # (the loop keeps only a weak reference to a task)
                task.add_done_callback(self._tasks.discard)
        return choose(ready, affinity_parts(affinity or []))

    async def _scale_down(self) -> None:
        """Forget the last replica of a model scaled above its floor (`min_replicas`, else `replicas`) once it has
        been idle `ray_scale_down_seconds`."""
        now = time.monotonic()
        for name, copies in list(self._wanted.items()):
            group = self.replicas(name)
            if not group:
                del self._wanted[name]
                continue
            config = group[0].config
            if copies <= (config.min_replicas or config.replicas):
                continue
            last = self.runners.get(runner_key(name, copies - 1))
            if last is None or (last.active == 0 and last.state == "ready"
                                and now - last.last_used >= self.settings.ray_scale_down_seconds):
                log.info("scaling '%s' down to %d replicas: replica %d is idle", name, copies - 1, copies - 1)
                self._wanted[name] = copies - 1
                if last is not None:
                    await self._forget(last)

    async def _replace(self, config: ModelConfig, replica: int) -> None:
        key = runner_key(config.name, replica)
        try:
            await self._ensure_replica(config, replica)
        except HearthError as exc:
            log.error("replica %d of '%s' could not be placed again: %s", replica, config.name, exc.message)
        finally:
            self._replacing.discard(key)

    async def _ensure_replica(self, config: ModelConfig, replica: int) -> Runner:
        key = runner_key(config.name, replica)
        runner = self.runners.get(key)
        if runner and runner.alive and runner.config == config:
            runner.last_used = time.monotonic()
            return runner
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            runner = self.runners.get(key)
            if runner and runner.alive and (runner.config == config or runner.active > 0):
                runner.last_used = time.monotonic()
                return runner
            if runner:
                reason = "its config changed" if runner.alive else f"it {runner.process.exit_description()}"
                if not runner.alive and runner.state == "ready":  # it died between requests: not counted yet
                    self.metrics.inc("hearth_runner_crashes_total", model=config.name)
                log.info("restarting the runner for '%s': %s", key, reason)
                await self._forget(runner)
            await self._make_room(config.name)
            return await self._load(config, replica)

    async def _load(self, config: ModelConfig, replica: int = 0) -> Runner:
        if self._closing or self._socket_dir is None:
            raise ModelLoadFailed("the server is shutting down")
        self._counter += 1
        process: RunnerProcess | RemoteRunner | RayRunner
        if config.runner:
            process = RemoteRunner(config.name, config.runner)
            slot = None
        elif self.cluster is not None:
            process = RayRunner(config, replica, self.cluster, config.threads, self.settings.log_level)
            slot = None
        else:
            slot = self._free_slot()
            process = RunnerProcess(config.name, self._socket_dir / f"r{self._counter}.sock",
                                    log_level=self.settings.log_level,
                                    cores_board=self.board.path if self.board and slot is not None else None)
        runner = Runner(name=config.name, config=config, process=process, slot=slot, metrics=self.metrics,
                        replica=replica)
        self.runners[runner.key] = runner
        backend = config.canonical_backend
        log.info("Loading model '%s' with backend %s", config.name, backend)
        started = time.monotonic()
        try:
            try:
                await process.start(self.settings.runner_start_timeout)
            except RuntimeError as exc:
                raise ModelLoadFailed(f"could not start a runner for model '{config.name}': {exc}") from None
            # The secret goes with every call when set (a runner started here inherits it with the environment).
            runner.client = RunnerClient(process.address, self.cluster.secret if isinstance(process, RayRunner)
                                         else self.settings.runner_secret)
            request = pb.LoadRequest(
                model_name=config.name,
                backend=backend,
                model_path=config.model_path or "",
                # The model's own adapt_threads, else the server's: the runner reads it from the config.
                config_json=config.model_copy(update={"adapt_threads": self.settings.adapt_threads
                                                      if config.adapt_threads is None else config.adapt_threads}
                                              ).model_dump_json(),
                threads=process.threads if isinstance(process, RayRunner) else config.threads or self.settings.threads,
                context_size=config.context_size or 0,
                parallel=config.parallel or 0,
                files={**({"mmproj": config.mmproj_path} if config.mmproj_path else {}), **config.part_paths},
            )
            try:
                async with self._turn_to_load(config):
                    runner.info = await runner.client.load(request, timeout=self.settings.load_timeout)
            except RunnerGone:
                if not await process.wait_exit(2.0):
                    raise ModelLoadFailed(f"lost the connection to the runner for model '{config.name}' while "
                                          f"loading it") from None
                hint = " (the system may be out of memory)" if process.returncode == -signal.SIGKILL else ""
                raise ModelLoadFailed(f"the runner for model '{config.name}' stopped ({process.exit_description()}) "
                                      f"while loading the model{hint}{process.last_words()}") from None
            except ModelLoadFailed as exc:
                raise ModelLoadFailed(f"model '{config.name}' failed to load: {exc.message}") from None
        except HearthError as exc:
            self.failures[config.name] = exc.message
            self.metrics.inc("hearth_model_loads_total", model=config.name, result="failed")
            log.error("%s", exc.message)
            await self._forget(runner)
            raise ModelLoadFailed(exc.message) from None
        except BaseException:
            await self._forget(runner)
            raise
        runner.state = "ready"
        runner.loaded_at = runner.last_used = time.monotonic()  # idle from now, not from when its load began
        self.metrics.inc("hearth_model_loads_total", model=config.name, result="ok")
        self.metrics.observe("hearth_model_load_duration_seconds", runner.loaded_at - started, model=config.name)
        self.failures.pop(config.name, None)
        log.info("model '%s' ready in %.2f s (runner pid %s)", config.name, time.monotonic() - started, process.pid)
        return runner

    @contextlib.asynccontextmanager
    async def _turn_to_load(self, config: ModelConfig) -> AsyncIterator[None]:
        """Held while a local runner loads its model (a runner on another machine loads into its own memory)."""
        if config.runner or self.cluster is not None:
            yield
            return
        if self._loading.locked():
            log.info("model '%s' waits for '%s' to finish loading: models load one at a time", config.name,
                     self._loading_name)
        async with self._loading:
            self._loading_name = config.name
            try:
                yield
            finally:
                self._loading_name = ""

    async def _make_room(self, name: str) -> None:
        """Unload least recently used idle models until one more (`name`) fits under max_loaded_models."""
        while name not in (names := {r.name for r in self.runners.values()}) \
                and len(names) >= self.settings.max_loaded_models:
            busy = {r.name for r in self.runners.values() if r.active or r.state != "ready"}
            idle = [r for r in self.runners.values() if r.name not in busy]
            if not idle:
                log.warning("all %d loaded models are busy; loading one more than max_loaded_models", len(names))
                return
            victim = min(idle, key=lambda r: r.last_used).name
            log.info("unloading '%s' (least recently used) to make room", victim)
            await asyncio.gather(*(self._forget(r) for r in self.replicas(victim)))

    def _free_slot(self) -> int | None:
        taken = {r.slot for r in self.runners.values()} | self._stopping_slots
        return next((i for i in range(SLOTS) if i not in taken), None)

    def _mark(self, runner: Runner, busy: bool) -> None:
        if self.board is not None and runner.slot is not None:
            self.board.mark(runner.slot, busy)

    async def _forget(self, runner: Runner) -> None:
        self._mark(runner, False)  # it may have died mid-request; no runner waits on it any more
        if runner.slot is not None:
            self._stopping_slots.add(runner.slot)
        if self.runners.get(runner.key) is runner:
            del self.runners[runner.key]
        if runner.state != "dead":
            runner.state = "stopping"
        if runner.client is not None:
            with contextlib.suppress(Exception):
                await runner.client.close()
        await runner.process.stop()
        runner.state = "dead"
        self._stopping_slots.discard(runner.slot)
        runner.slot = None  # free for the next runner: a request still ending on this one no longer marks it

    # -- management ------------------------------------------------------------------------------------

    async def unload(self, name: str) -> bool:
        replicas = self.replicas(name)
        if not replicas:
            return False
        log.info("unloading model '%s'", name)
        self._wanted.pop(name, None)
        await asyncio.gather(*(self._forget(runner) for runner in replicas))
        return True

    async def _reap_idle(self) -> None:
        """Unload runners idle longer than their keep_alive, or than idle_unload_minutes (0: never)."""
        default = self.settings.idle_unload_minutes * 60 or None
        while True:
            await asyncio.sleep(1.0 if default is None or self._wanted else min(max(default / 4, 1.0), 30.0))
            await self._scale_down()
            now = time.monotonic()
            for runner in list(self.runners.values()):
                limit = runner.keep_alive if runner.keep_alive is not None else default
                if limit is not None and limit >= 0 and runner.active == 0 and runner.state == "ready" \
                        and now - runner.last_used >= limit:
                    log.info("unloading '%s': idle for %.0f s", runner.name, now - runner.last_used)
                    await self._forget(runner)

    async def _watch(self) -> None:
        """The watchdog: a runner with requests in flight must answer a health check within
        `runner_watchdog_seconds`. One that does not (stopped, or hung in a call that holds its interpreter) is
        killed: its requests end with an error that says so, and the next request starts a fresh runner. A runner
        busy in a long computation still answers (its event loop runs beside the work)."""
        limit = self.settings.runner_watchdog_seconds
        if not limit:
            return
        while True:
            await asyncio.sleep(min(5.0, limit / 2))
            watched = [r for r in self.runners.values() if r.state == "ready" and r.active and r.client is not None
                       and isinstance(r.process, RunnerProcess | RayRunner)]
            await asyncio.gather(*(self._check(runner, limit) for runner in watched))

    async def _check(self, runner: Runner, limit: float) -> None:
        assert runner.client is not None
        try:
            await runner.client.health(timeout=limit)
        except Exception:  # no answer in time (or the connection is gone: the crash handling takes that)
            if runner.state == "ready" and runner.process.returncode is None:
                log.error("the runner for '%s' (pid %s) did not answer for %g s with requests in flight; killing it",
                          runner.name, runner.process.pid, limit)
                runner.stuck = f"made no progress for {limit:g} s"
                runner.process.kill()

    def status(self) -> list[dict[str, Any]]:
        return [runner.status() for runner in self.runners.values()]

    async def shutdown(self) -> None:
        self._closing = True
        for task in (self._reaper, self._watchdog):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(*(self._forget(r) for r in list(self.runners.values())), return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.close()
        if self.board is not None:
            self.board.close()
            self.board = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
