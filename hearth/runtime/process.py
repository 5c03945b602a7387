"""Starting and stopping one runner process, and reading what it says on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("hearth.runtime")

HUGE_PAGES = "glibc.malloc.hugetlb"  # the glibc tunable (2.35 and later) for malloc's transparent huge pages


def runner_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a runner starts in: the server's, unbuffered, and with glibc's malloc asking the kernel for
    transparent huge pages on the memory it maps (`glibc.malloc.hugetlb=1`), unless GLIBC_TUNABLES already sets that
    tunable. Model weights read into a runner's memory then sit in 2 MiB pages instead of 4 KiB ones, and llama.cpp
    decodes from them 4 to 11% faster on CPU (benchmarks/README.md), for 15 to 17 MiB more memory per llama.cpp
    runner as measured. Where the kernel's transparent huge pages are off, or the C library is not glibc, the setting
    does nothing."""
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    tunables = env.get("GLIBC_TUNABLES", "")
    if not any(item.split("=", 1)[0] == HUGE_PAGES for item in tunables.split(":")):
        env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}=1" if tunables else f"{HUGE_PAGES}=1"
    return env


class RunnerProcess:
    """A `python -m hearth.runner` child listening on a Unix socket the server chose."""

    def __init__(self, name: str, socket_path: Path, *, log_level: str = "info",
                 cores_board: Path | None = None) -> None:
        self.name = name
        self.socket_path = socket_path
        self.log_level = log_level
        self.cores_board = cores_board
        self.process: asyncio.subprocess.Process | None = None
        self.recent_lines: deque[str] = deque(maxlen=40)
        self._readers: list[asyncio.Task] = []

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def start(self, timeout: float) -> None:
        """Spawn the runner and wait until its socket accepts connections."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        env = runner_environment(os.environ)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hearth.runner", "--listen", self.address, "--parent-pid", str(os.getpid()),
            "--log-level", self.log_level, "--name", self.name,
            *(["--cores-board", str(self.cores_board)] if self.cores_board else []),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env,  # (the runner puts itself in a process group of its own: hearth/runner/__main__.py)
        )
        self._readers = [asyncio.create_task(self._pump(self.process.stdout, logging.DEBUG)),
                         asyncio.create_task(self._pump(self.process.stderr, logging.INFO))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.socket_path.exists():
            if self.process.returncode is not None:
                raise RuntimeError(f"the runner exited ({self.exit_description()}) before it was ready"
                                   f"{self.last_words()}")
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"the runner did not start listening within {timeout:.0f} s{self.last_words()}")
            await asyncio.sleep(0.02)

    async def _pump(self, stream: asyncio.StreamReader | None, level: int) -> None:
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.recent_lines.append(line)
                log.log(level, "[%s] %s", self.name, line)

    def exit_description(self) -> str:
        code = self.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def last_words(self) -> str:
        lines = [line for line in self.recent_lines
                 if "Traceback" not in line and not line.startswith('{"event"')][-3:]
        return f"; last output: {' | '.join(lines)}" if lines else ""

    async def wait_exit(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def kill(self) -> None:
        """SIGKILL at once (it ends a stopped or hung process too)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; the socket file is removed either way."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            if not await self.wait_exit(grace):
                log.warning("runner for '%s' (pid %s) did not stop in %.0f s; killing it", self.name, self.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.wait_exit(5.0)
        for reader in self._readers:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 1.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class RemoteRunner:
    """A runner someone started by hand (`python -m hearth.runner --listen HOST:PORT`), named in a model config.

    Hearth does not own its process: it only connects, loads the model, and disconnects when unloading.
    """

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.pid = None
        self.returncode = None
        self.recent_lines: deque[str] = deque(maxlen=1)

    async def start(self, timeout: float) -> None:
        """Nothing to start: the runner is already listening."""

    def exit_description(self) -> str:
        return f"remote runner at {self.address}"

    def last_words(self) -> str:
        return ""

    async def wait_exit(self, timeout: float) -> bool:
        return False  # a remote runner that goes away is a lost connection, not a crash we can see

    async def stop(self, grace: float = 5.0) -> None:
        """The runner belongs to whoever started it; disconnecting is enough."""
