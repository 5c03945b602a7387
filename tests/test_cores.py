"""How a runner judges outside load from what the kernel reports: the decisions of `OutsideLoad`, fed scripted
readings (the real readings, on a real runner under real busy loops, are tested in tests/test_busy_machine.py)."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time

import pytest

from hearth.cores import OutsideLoad, _spare_seconds, _thread_times


class Machine:
    """Scripted readings: each `step` advances the clock by `seconds` of computing with `threads` threads, each of
    which spends the share `waiting` of it waiting for a core, while `idle` cores stood idle; a helper thread (the
    runner's event loop) runs `helper` of the time and waits `helper_waiting`."""

    def __init__(self) -> None:
        self.now = 100.0
        self.threads = {name: [0, 0] for name in ("decode", "worker", "loop")}
        self.idle = 0.0
        self.load = OutsideLoad(2, read=self.read, clock=lambda: self.now)

    def read(self) -> tuple[dict[str, tuple[int, int]], float]:
        return {name: (ran, waited) for name, (ran, waited) in self.threads.items()}, self.idle

    def step(self, threads: int, waiting: float = 0.0, idle: float = 0.0, seconds: float = 0.11,
             helper: float = 0.0, helper_waiting: float = 0.0) -> int:
        self.now += seconds
        for name in ("decode", "worker")[:threads]:
            self.threads[name][0] += int(seconds * (1 - waiting) * 1e9)
            self.threads[name][1] += int(seconds * waiting * 1e9)
        self.threads["loop"][0] += int(seconds * helper * 1e9)
        self.threads["loop"][1] += int(seconds * helper_waiting * 1e9)
        self.idle += idle * seconds
        return self.load.limit(2)


def test_a_thread_is_given_up_while_the_cores_are_taken_and_taken_back_when_one_stands_idle(caplog) -> None:
    machine = Machine()
    caplog.set_level(logging.INFO, "hearth.cores")
    assert machine.step(2) == 2  # the first look only starts a window
    assert machine.step(2, waiting=0.5) == 2  # one window of waiting alone may be a burst
    assert machine.step(2, waiting=0.5) == 1  # the second in a row is a load that stays
    for _ in range(5):  # a busy loop holds the other core: nothing idle, no waiting with one thread
        assert machine.step(1) == 1
    assert machine.step(1, idle=0.9) == 2  # the loop paused: the core is taken back at once, not at the next probe
    assert machine.step(2) == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "computing with 1 of 2 threads", "computing with all 2 threads again"]


def test_blind_probes_back_off_while_the_waiting_comes_back() -> None:
    machine = Machine()
    machine.step(2)
    machine.step(2, waiting=0.5)
    assert machine.step(2, waiting=0.5) == 1
    tries = []
    for _ in range(80):  # 8 s of a nice-19 loop that keeps its core busy (never idle) and makes two threads wait
        using = machine.step(1 if machine.load.cap else 2, waiting=0.0)
        if using == 2:
            tries.append(round(machine.now, 1))
            assert machine.step(2, waiting=0.5) == 1  # a probe's one window of waiting is enough: the load was there
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps and gaps == sorted(gaps) and gaps[-1] == pytest.approx(OutsideLoad.MAX_PROBE + 0.11, abs=0.15)


def test_a_load_that_comes_and_goes_is_logged_at_most_once_a_minute(caplog) -> None:
    machine = Machine()
    caplog.set_level(logging.INFO, "hearth.cores")
    machine.step(2)
    for _ in range(30):  # 13 s of a load that spins half of every 0.44 s
        machine.step(machine.load.cap or 2, waiting=0.5)
        machine.step(machine.load.cap or 2, waiting=0.5)
        machine.step(machine.load.cap or 2, idle=0.9)
        machine.step(machine.load.cap or 2)
    assert len(caplog.records) == 2


def test_short_bursts_do_not_take_a_thread() -> None:
    """A load that spins 50 ms of every 100 ms: the windows in which the threads waited most alternate with calmer
    ones (measured: 10-27% waiting each), and two threads ride it out better than one (benchmarks/README.md)."""
    machine = Machine()
    machine.step(2)
    for _ in range(30):
        assert machine.step(2, waiting=0.25) == 2
        assert machine.step(2, waiting=0.12) == 2


def test_an_idle_stretch_between_requests_is_not_judged() -> None:
    machine = Machine()
    machine.step(2)
    machine.step(2, waiting=0.5)
    assert machine.step(2, waiting=0.5) == 1
    machine.now += 30  # no request for 30 s: no computing, so that stretch is not judged
    assert machine.load.limit(2) == 1
    # Nor does it count towards the next blind try, which comes after the computing time it would have come after
    # (the longer of PROBE and PROBE_COST times the last window's).
    computed = 0.11  # (the window that gave the thread up)
    while machine.step(1) == 1:
        computed += 0.11
    assert computed == pytest.approx(max(OutsideLoad.PROBE, OutsideLoad.PROBE_COST * 0.11), abs=0.25)


def test_a_try_that_crawled_is_not_made_again_for_a_long_while() -> None:
    """Beside two busy loops a step with two threads can take seconds (each thread preempted at the barriers while
    its partner spins): blind tries are kept to at most one such cost in PROBE_COST of the computing time."""
    machine = Machine()
    machine.step(2)
    machine.step(2, waiting=0.5)
    assert machine.step(2, waiting=0.5) == 1
    while machine.step(1) == 1:
        pass
    assert machine.step(2, waiting=0.5, seconds=2.0) == 1  # the try: one step of two seconds
    computed = 0.11
    while machine.step(1) == 1:
        computed += 0.11
    assert computed == pytest.approx(min(OutsideLoad.LONGEST_PROBE, OutsideLoad.PROBE_COST * 2.0), abs=0.25)


def test_the_runners_own_helper_threads_waiting_is_not_outside_load() -> None:
    """The event loop and gRPC threads wake for a moment while llama.cpp's threads hold both cores, and wait."""
    machine = Machine()
    machine.step(2)
    for _ in range(20):
        assert machine.step(2, waiting=0.02, helper=0.05, helper_waiting=0.6) == 2


def test_the_kernel_readings_exist_here() -> None:
    """The readings the runner judges by are there on this machine (Linux with schedstat)."""
    times = _thread_times()
    assert times and all(ran > 0 and waited >= 0 for ran, waited in times.values())
    idle = _spare_seconds(frozenset(range(64)))
    assert idle is not None and idle > 0


def test_a_core_held_by_a_niced_process_counts_as_spare() -> None:
    """A busy loop at nice 19 gives its core up to any process that wants it: its time is spare for a runner (which
    then takes its thread back at once instead of waiting for a blind try); a loop at nice 0 is not."""
    cpus = frozenset(os.sched_getaffinity(0))

    def spare_beside(nice: int) -> float:
        loop = subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            before, start = _spare_seconds(cpus), time.monotonic()
            time.sleep(1.0)
            after, span = _spare_seconds(cpus), time.monotonic() - start
        finally:
            loop.kill()
            loop.wait()
        assert before is not None and after is not None
        return (after - before) / span  # cores' worth of spare time

    niced, plain = spare_beside(19), spare_beside(0)
    assert niced > plain + 0.5, (niced, plain)  # the loop's core, about 1.0 more
