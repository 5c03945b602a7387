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

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("hearth.cores")

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


def _thread_times() -> dict[str, tuple[int, int]] | None:
    """Each of this process's threads' nanoseconds on a core and runnable but waiting for one (Linux's schedstat)."""
    times = {}
    try:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/schedstat", "rb") as stats:
                fields = stats.read().split()
                times[task] = (int(fields[0]), int(fields[1]))
    except (OSError, ValueError, IndexError):
        return None
    return times


def _spare_seconds(cpus: frozenset[int]) -> float | None:
    """Seconds the CPUs this process may run on have spent idle, or running processes of lowered priority (nice above
    0), which give a core up to any other that wants it, since boot (Linux's /proc/stat, in clock ticks)."""
    total = 0
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if not line.startswith(b"cpu"):
                    break
                name, *fields = line.split()
                if name != b"cpu" and int(name[3:]) in cpus:
                    total += int(fields[1]) + int(fields[3]) + int(fields[4])  # nice, idle and iowait
    except (OSError, ValueError, IndexError):
        return None
    return total / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


def _cpus() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


class OutsideLoad:
    """Load this server did not start, seen from the runner that computes, and the threads it leaves us.

    llama.cpp's threads (and torch's) wait for one another after every operation, spinning: when another process
    takes one of the cores, the partner of the preempted thread spins through its time, and a step that took 15 ms
    takes hundreds (Qwen2.5-Coder 0.5B on 2 cores, 2 threads: 65 tokens/s quiet, 1 to 3 beside one busy loop at nice 0
    or even 19; with 1 thread, 50 either way). So the runner watches how long its threads wait for a core: after two
    windows in a row in which they spent more than WAITING of their runnable time waiting, one thread is given up
    (one such window alone is often a load that comes and goes: a process spinning 50 ms of every 100 gave 10-27%
    windows, a steady busy loop 25-43%, and two threads ride out the short bursts better). It is taken
    back after a window in which the cores were spare for at least SPARE of a core: idle (a bursty load that paused,
    a build that ended), or running processes of lowered priority (nice above 0), which give way to the runner. And
    it is tried again for a window anyway (for a load of lower priority that the kernel's counts do not show: a
    cgroup's weight, SCHED_IDLE), after PROBE seconds of computing; if the waiting comes back, it is given up again
    (at once: the load was there) and the next blind try waits twice as long, up to MAX_PROBE. Every try also waits
    at least PROBE_COST times what the last window with the thread cost (up to LONGEST_PROBE): beside two busy loops
    one step with two threads took 0.1 to 2.8 s (each thread preempted at the step's barriers while its partner
    spun), and tries every 4 s made one stream run at about 8 tokens/s in 3 to 5 rounds of 10 where it otherwise ran
    at 15. The tries are timed in computing time, so a pause between requests does not bring the next one nearer.
    """

    WINDOW = 0.1  # seconds between judgements (a window in which the threads mostly did not compute is not judged)
    WAITING = 0.2  # share of the threads' runnable time spent waiting for a core that means the cores are taken
    COMPUTING = 0.25  # share of a window a thread ran for to count as one that computes
    SPARE = 0.25  # cores' worth of spare time (idle, or running niced processes) over a window that means one is free
    PROBE = 1.0
    MAX_PROBE = 4.0
    PROBE_COST = 20.0
    LONGEST_PROBE = 60.0
    QUIET = 60.0

    def __init__(self, cores: int,
                 read: Callable[[], tuple[dict[str, tuple[int, int]] | None, float | None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores = cores
        self._read = read or self._readings
        self._clock = clock
        self.cap: int | None = None  # threads allowed now; None: no limit of its own
        self._window = 0.0
        self._times: dict[str, tuple[int, int]] | None = None  # each thread's (running, waiting) at the window's start
        self._cpus = _cpus()
        self._spare = 0.0  # the machine's spare time (s) at the window's start
        # A runner that is itself niced counts its own time among the niced processes' (it is not spare for it).
        self._niced = _niceness() > 0
        self._computed = 0.0  # seconds the threads computed through the windows judged: the clock of blind tries
        self._probe_at = 0.0
        self._probe_every = self.PROBE
        self._probing = False
        self._over = False  # the last window judged had the threads waiting more than WAITING
        self._said: dict[str, float] = {}

    def limit(self, threads: int) -> int:
        """The threads to compute with, given `threads` otherwise; judged once a window of computing."""
        using = self._allowed(threads)
        now = self._clock()
        if now - self._window < self.WINDOW:
            return using
        times, spare = self._read()
        if times is None:
            return using
        before, span = self._times, now - self._window
        start_spare = self._spare
        self._window, self._times, self._spare = now, times, spare or 0.0
        if before is None:
            return using
        # Summed over the threads that computed through the window: llama.cpp's (a preempted one waits, its partner
        # spins, running), not the runner's own helpers (gRPC, the event loop), which run a moment at a time and,
        # woken while the computing threads hold the cores, wait for them: that is not load from outside.
        running = waiting = own = 0.0
        computing = 0
        for task, (ran, waited_ns) in times.items():
            ran0, waited0 = before.get(task, (0, 0))
            own += (ran - ran0) / 1e9
            if (ran - ran0) / 1e9 >= self.COMPUTING * span:
                computing += 1
                running += (ran - ran0) / 1e9
                waiting += (waited_ns - waited0) / 1e9
        if running + waiting < self.WINDOW / 2:
            return using  # mostly idle through the window (between requests): too little to judge by
        runnable = (running + waiting) / computing  # seconds the computing threads could have computed, each
        self._computed += runnable
        free = (spare - start_spare - (own if self._niced else 0.0)) / span if spare is not None else 0.0
        waited = waiting / (waiting + running)
        over, self._over = self._over, waited > self.WAITING
        if waited > self.WAITING and using > 1 and (over or self._probing):
            self._over = False
            self.cap = using - 1
            # A try costs about what this window did: the time the threads were runnable with the thread now given
            # up (steps with a thread too many can take seconds while the cores are taken). Tries are kept to at
            # most one such cost in PROBE_COST of the time.
            doubled = min(self.MAX_PROBE, self._probe_every * 2) if self._probing else self.PROBE
            self._probe_every = max(doubled, min(self.LONGEST_PROBE, self.PROBE_COST * runnable))
            if not self._probing:
                self._say(f"computing with {self.cap} of {threads} threads: other processes keep this runner's "
                          f"threads waiting for a core ({waited:.0%} of their time)")
            self._probe_at, self._probing = self._computed + self._probe_every, False
        elif self._probing:
            self._probing, self._probe_every = False, self.PROBE  # the thread tried again is kept
            if self.cap is None:
                self._say(f"computing with all {threads} threads again: the cores are free")
        elif self.cap is not None and (self._computed >= self._probe_at or free >= self.SPARE):
            self.cap = self.cap + 1 if self.cap + 1 < threads else None
            self._probing = True
        return self._allowed(threads)

    def _readings(self) -> tuple[dict[str, tuple[int, int]] | None, float | None]:
        """Each thread's running and waiting for a core (ns), the machine's spare time (s)."""
        return _thread_times(), _spare_seconds(self._cpus)

    def _allowed(self, threads: int) -> int:
        return min(threads, self.cap) if self.cap else threads

    def _say(self, message: str) -> None:
        """Said when the runner leaves the threads it was configured with, and when it is back to them (the probes
        between are not told); under a load that comes and goes, each at most once every QUIET seconds."""
        kind = message.split(":")[0]
        now = self._clock()
        if now - self._said.get(kind, -self.QUIET) >= self.QUIET:
            self._said[kind] = now
            log.info(message)


def adapting() -> bool:
    """Whether runners adapt their threads to outside load, for a runner whose config does not say (a server sends
    its model's `adapt_threads` or its own setting): HEARTH_ADAPT_THREADS, on unless 0/false/no/off."""
    return os.environ.get("HEARTH_ADAPT_THREADS", "1").strip().lower() not in ("0", "false", "no", "off")


class Share:
    """How many threads a runner computes with right now; asked before each step, by the thread that computes."""

    def __init__(self, threads: int, board: Board | None = None, cores: int | None = None, *,
                 adapt: bool | None = None) -> None:
        self.configured = max(1, threads)
        self.board = board
        self.cores = cores or machine_cores()
        adapt = adapting() if adapt is None else adapt
        self.outside = OutsideLoad(self.cores) if adapt and self.configured > 1 else None

    def threads(self) -> int:
        threads = self.configured
        if self.board is not None:
            busy = self.board.busy()
            if busy > 1:
                threads = max(1, min(self.configured, self.cores // busy))
        return self.outside.limit(threads) if self.outside is not None else threads


def follow_in_torch(share: Share, torch: object) -> int:
    """Set torch's intra-op threads to the share now (torch is passed in: this module imports no library)."""
    threads = share.threads()
    if torch.get_num_threads() != threads:  # type: ignore[attr-defined]
        torch.set_num_threads(threads)  # type: ignore[attr-defined]
    return threads
