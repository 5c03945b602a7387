"""Speed on a busy machine: Hearth beside llama.cpp's `llama-server`, same GGUF and threads, rounds alternating,
while other processes want the cores.

Loads: none; one busy loop at nice 0; one at nice 19; two busy loops; a bursty load (spins 50 ms of every 100 ms).
For each, one stream and four streams, each server asked in turn. Rates are tokens/s: "streamed" as the client sees
them from first to last token, "whole" from the server's own `timings` (predicted_per_second; for four streams the
sum over the streams' wall time).

    python benchmarks/busy_machine.py --llama-cpp-bin /tmp/lcpbuild/bin [--model qwen2.5-coder-0.5b-instruct]

`--baseline DIR` adds a third server, asked in the same rounds: the API process from another checkout of Hearth (the
code before this work) with its runners under HEARTH_ADAPT_THREADS=0 (runners always come from this checkout), for
a before-and-after in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    concurrent_streams,
    install,
    machine_line,
    start_hearth,
    start_llama_server,
    stop,
    stream_completion,
)

BUSY = "while True: pass"
BURSTY = ("import time\nwhile True:\n    end = time.perf_counter() + 0.05\n    while time.perf_counter() < end: pass\n"
          "    time.sleep(0.05)")
LOADS = {"none": [], "busy nice 0": [(0, BUSY)], "busy nice 19": [(19, BUSY)],
         "two busy": [(0, BUSY), (0, BUSY)], "bursty": [(0, BURSTY)]}


def start_load(spec: list[tuple[int, str]]) -> list[subprocess.Popen]:
    return [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", code]) for nice, code in spec]


def measure(base: str, model: str, tokens: int, streams: int) -> tuple[float, float]:
    """(streamed, whole) tokens/s."""
    if streams == 1:
        result = stream_completion(base, model, "Write a long story about a lighthouse keeper.", tokens)
        whole = (result.timings or {}).get("predicted_per_second", 0.0)
        return result.rate, whole
    aggregate, results = concurrent_streams(base, model, streams, tokens)
    whole = sum((r.timings or {}).get("predicted_per_second", 0.0) for r in results)
    return aggregate, whole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp-bin", type=Path, required=True)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", nargs="+", default=list(LOADS))
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--baseline", help="a checkout of Hearth to run as the baseline")
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp())
    path = install(models, args.model, parallel=4, context_size=4096)
    print(machine_line(model=args.model, threads=args.threads, tokens=args.tokens, rounds=args.rounds))
    servers = {"Hearth": start_hearth(models, args.threads)}
    if args.baseline:
        os.environ.update(HEARTH_ADAPT_THREADS="0", HEARTH_CHECKOUT=args.baseline)
        servers["baseline"] = start_hearth(models, args.threads)
        del os.environ["HEARTH_ADAPT_THREADS"], os.environ["HEARTH_CHECKOUT"]
    servers["llama-server"] = start_llama_server(args.llama_cpp_bin / "llama-server", path, args.threads)
    try:
        for _, base in servers.values():  # warm each
            measure(base, args.model, 8, 1)
        names = list(servers)
        print("| load | streams | " + " | ".join(f"{n} {kind}" for kind in ("streamed", "whole") for n in names)
              + " |")
        print("|---|---|" + "---|" * 2 * len(names))
        for load in args.loads:
            for streams in args.streams:
                rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
                for round_ in range(args.rounds):
                    shift = round_ % len(names)  # each server goes first in turn
                    for name in names[shift:] + names[:shift]:
                        others = start_load(LOADS[load])
                        time.sleep(0.5)
                        try:
                            rates[name].append(measure(servers[name][1], args.model, args.tokens, streams))
                        finally:
                            for process in others:
                                process.kill()
                                process.wait()
                cells = [statistics.median(r[i] for r in rates[name]) for i in (0, 1) for name in names]
                print(f"| {load} | {streams} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
