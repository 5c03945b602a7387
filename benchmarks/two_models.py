"""Two models generating at the same time: each alone, then both at once, through the HTTP API.

    python benchmarks/two_models.py [--models A B] [--threads 2] [--tokens 128] [--rounds 3]

Both models are served by one Hearth, each in its runner, with the same thread count. Every round streams one
greedy request to each model alone, then one to each at the same time. It reports each model's generation rate
(client side, first token to last) alone and at once, and the two requests' tokens over the wall time of the pair:
one after the other against at once. While both work, each runner computes with its share of the cores
(hearth/cores.py); before that, each took every core and the two fought over them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import PROMPT, StreamResult, install, machine_line, start_hearth, stop, stream_completion

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


def measure_into(results: dict[str, StreamResult], base: str, model: str, tokens: int) -> None:
    results[model] = stream_completion(base, model, PROMPT, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs=2, default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(machine_line(threads=args.threads, tokens=args.tokens, rounds=args.rounds) + "\n")
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            install(Path(tmp), name, parallel=1, context_size=2048)
        hearth, base = start_hearth(Path(tmp), args.threads)
        try:
            for name in args.models:
                stream_completion(base, name, "warm up", 8)
            for _ in range(args.rounds):
                took = 0.0
                for name in args.models:
                    started = time.perf_counter()
                    samples.setdefault(f"alone {name}", []).append(
                        stream_completion(base, name, PROMPT, args.tokens).rate)
                    took += time.perf_counter() - started
                samples.setdefault("one after the other", []).append(2 * args.tokens / took)
                results: dict[str, StreamResult] = {}
                threads = [threading.Thread(target=measure_into, args=(results, base, name, args.tokens))
                           for name in args.models]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                samples.setdefault("at once", []).append(2 * args.tokens / (time.perf_counter() - started))
                for name in args.models:
                    samples.setdefault(f"at once {name}", []).append(results[name].rate)
        finally:
            stop(hearth)
    print("| model | alone, tok/s | at once, tok/s |\n|---|---|---|")
    for name in args.models:
        print(f"| {name} | {statistics.median(samples[f'alone {name}']):.1f} | "
              f"{statistics.median(samples[f'at once {name}']):.1f} |")
    print(f"\nBoth requests' tokens over their wall time: one after the other "
          f"{statistics.median(samples['one after the other']):.1f} tok/s, at once "
          f"{statistics.median(samples['at once']):.1f} tok/s (medians of {args.rounds} rounds).")


if __name__ == "__main__":
    main()
