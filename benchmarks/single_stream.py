"""Single-stream generation speed: Hearth over HTTP versus llama-cpp-python in-process, as ratios in one run.

    python benchmarks/single_stream.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]
                                       [--threads 2] [--tokens 128] [--rounds 3]

Both sides run the same GGUF with the same thread count (the baseline in a fresh process of its own each round), greedy, generating exactly --tokens tokens (end of
sequence ignored). The rounds alternate between the two so that drift in the machine's speed hits both alike.
Hearth's rate is measured by the client from the first streamed token to the last (HTTP, SSE, the API process
and the runner process all included); the runner's own measurement is shown beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import baseline_in_fresh_process, install, machine_line, start_hearth, stop, stream_completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        paths = {name: install(models_dir, name, context_size=2048, parallel=1) for name in args.models}
        process, base = start_hearth(models_dir, args.threads)
        try:
            print(machine_line(threads=args.threads, tokens=args.tokens, rounds=args.rounds))
            print("| model | llama-cpp-python in-process tok/s | Hearth over HTTP tok/s | Hearth runner tok/s | "
                  "ratio HTTP / in-process |")
            print("|---|---|---|---|---|")
            for name in args.models:
                stream_completion(base, name, "warm up", 8)
                base_rates, http_rates, runner_rates = [], [], []
                for _ in range(args.rounds):  # alternate: the baseline runs in a fresh process each round
                    base_rates += baseline_in_fresh_process(paths[name], args.threads, args.tokens, 1)
                    result = stream_completion(base, name, "Write a long story about a lighthouse keeper.",
                                               args.tokens)
                    http_rates.append(result.rate)
                    runner_rates.append(result.timings["predicted_per_second"])
                b, h, r = (statistics.median(x) for x in (base_rates, http_rates, runner_rates))
                print(f"| {name} | {b:.1f} | {h:.1f} | {r:.1f} | {h / b:.3f} |", flush=True)
        finally:
            stop(process)


if __name__ == "__main__":
    main()
