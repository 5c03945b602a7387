"""Sharing the machine's cores between models that compute at the same time.

llama.cpp splits every step of a model across a fixed number of threads, and those threads wait for one another
after each operation. Two runners that each use every core, computing at the same time, keep preempting each
other's threads mid-step, and the threads left running then spin while they wait for a partner that is not.
Measured on 2 cores: SmolLM2 and Qwen decoding at once, 2 threads each, fell from 124 and 50 tokens/s alone to
between 2 and 24 each; with one thread each they run at 77 and 25 at once.

So the API process, which knows which runners have requests in flight, keeps a small file (the board) with one
byte per runner it started, set while that runner is working. Before each step a runner reads the board and
computes with its share of the cores: all of its configured threads while it works alone, the cores divided by
the number of busy runners when others work too (at least one thread). Runners started by hand on another
machine get no board and always use their configured threads. torch's backends (diffusers, transformers, the
torch path of sentence-transformers) follow the board the same way, between steps; faster-whisper and onnxruntime
fix their threads when they load: their runners are marked on the board all the same, and the others give way.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SLOTS = 256  # runners a board can follow; more than that are simply not counted


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Board:
    """The board file: `create` it in the API process, open it by path in a runner."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, SLOTS)
        else:
            fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, SLOTS, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def mark(self, slot: int, busy: bool) -> None:
        if 0 <= slot < SLOTS:
            self._map[slot] = 1 if busy else 0

    def busy(self) -> int:
        """How many runners are working now."""
        return SLOTS - self._map[:].count(0)

    def close(self) -> None:
        self._map.close()


class Share:
    """How many threads a runner computes with right now; asked before each step."""

    def __init__(self, threads: int, board: Board | None = None, cores: int | None = None) -> None:
        self.configured = max(1, threads)
        self.board = board
        self.cores = cores or machine_cores()

    def threads(self) -> int:
        if self.board is None:
            return self.configured
        busy = self.board.busy()
        if busy <= 1:
            return self.configured
        return max(1, min(self.configured, self.cores // busy))


def follow_in_torch(share: Share, torch: object) -> int:
    """Set torch's intra-op threads to the share now (torch is passed in: this module imports no library)."""
    threads = share.threads()
    if torch.get_num_threads() != threads:  # type: ignore[attr-defined]
        torch.set_num_threads(threads)  # type: ignore[attr-defined]
    return threads
