"""Continuous batching: Hearth versus llama.cpp's own tools and llama-cpp-python, as ratios in one run.

    python benchmarks/concurrency.py [--models ...] [--threads 2] [--tokens 128] [--llama-cpp-bin DIR]

For each model it measures, one after another so nothing competes for the cores:
- llama.cpp's `llama-bench` (pp512, tg128) and `llama-server --parallel 4`, when --llama-cpp-bin names a folder
  holding them (build them from the llama.cpp sources llama-cpp-python vendors; see benchmarks/README.md);
- llama-cpp-python's high-level API in-process, single stream;
- Hearth's decode loop alone, in a long-lived process of its own (no gRPC, no HTTP), single stream, paired
  with `llama-bench` tg as in benchmarks/decode_loop.py;
- Hearth over HTTP: single-stream generation, the runner's own decode rate, prompt processing, time to first
  token, aggregate generation at 1, 2, 4 and 8 concurrent streams, and a repeated ≥1,000-token prompt.
Every stream is greedy and generates exactly --tokens tokens (end of sequence ignored). Hearth and llama-server
are measured back to back within each round, which one goes first alternating by round; besides the ratio of
medians, the tables give the median of each round's own ratio, which the machine's drift between rounds does not
move, with a distribution-free 95% confidence interval for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import (
    PROMPT,
    baseline_in_fresh_process,
    concurrent_streams,
    generation_arguments,
    install,
    llama_bench,
    machine_line,
    start_hearth,
    start_llama_server,
    stop,
    stream_completion,
)
from decode_loop import Worker, median_interval, paired_rates

LONG_PROMPT = " ".join(f"Paragraph {i}: the keeper climbed the stairs, trimmed the wick and watched the sea."
                       for i in range(60))  # about 1,200 tokens


def measure(models_dir: Path, name: str, path: Path, args: argparse.Namespace) -> dict:
    """Hearth and llama-server loaded side by side, measured in alternation so drift hits both alike."""
    hearth, hearth_base = start_hearth(models_dir, args.threads)
    server = server_base = None
    if args.llama_cpp_bin:
        server, server_base = start_llama_server(args.llama_cpp_bin / "llama-server", path, args.threads)
    try:
        samples: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            samples.setdefault(key, []).append(value)

        stream_completion(hearth_base, name, "warm up", 8)
        if server_base:
            stream_completion(server_base, "x", "warm up", 8)
        for round_ in range(args.rounds):  # the two servers back to back, which goes first alternating by round
            order = ("hearth", "server") if round_ % 2 == 0 else ("server", "hearth")
            for which in order:
                if which == "hearth":
                    single = stream_completion(hearth_base, name, PROMPT, args.tokens)
                    add("single_http", single.rate)
                    add("single_runner", single.timings["predicted_per_second"])
                    add("ttft_short", single.ttft)
                elif server_base:
                    add("server_single", stream_completion(server_base, "x", PROMPT, args.tokens).rate)
            if server_base:
                add("pair_single", samples["single_http"][-1] / samples["server_single"][-1])
            for n in (1, 2, 4, 8):
                for which in order if n == 4 else ("hearth",):
                    if which == "hearth":
                        add(f"agg{n}", concurrent_streams(hearth_base, name, n, args.tokens)[0])
                    elif server_base:
                        add("server_agg4", concurrent_streams(server_base, "x", 4, args.tokens)[0])
            if server_base:
                add("pair_agg4", samples["agg4"][-1] / samples["server_agg4"][-1])
        for i in range(args.rounds):
            pp = stream_completion(hearth_base, name, f"{i} " + LONG_PROMPT[:2600], 1)
            add("prompt_tps", pp.timings["prompt_per_second"])
        numbers = {key: statistics.median(values) for key, values in samples.items()}
        numbers.update({f"{key}_ci": median_interval(values) for key, values in samples.items()
                        if key.startswith("pair_")})
        first = stream_completion(hearth_base, name, LONG_PROMPT + " Once more:", 4)
        second = stream_completion(hearth_base, name, LONG_PROMPT + " Once more:", 4)
        numbers.update(long_prompt_tokens=first.timings["prompt_n"], long_first=first.ttft, long_second=second.ttft)
        return numbers
    finally:
        stop(hearth)
        if server:
            stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generation_arguments(parser, "folder with llama-bench and llama-server", required=False)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(machine_line(threads=args.threads, tokens=args.tokens, rounds=args.rounds) + "\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        for name in args.models:
            path = install(models_dir, name, parallel=8, context_size=2048)
            row: dict = {"model": name}
            # llama-bench tg and Hearth's decode loop alone (a long-lived process, as the runner is), back to back,
            # twice a round, the order alternating so that a drift of the machine's speed favours neither.
            if args.llama_cpp_bin:
                rates = paired_rates(args.llama_cpp_bin / "llama-bench", path, args.threads, args.tokens,
                                     2 * args.rounds, label=name)
                row["bench_tg"] = statistics.median(rates["bench"])
                ratios = [a / b for a, b in zip(rates["loop"], rates["bench"], strict=True)]
                row["pair_loop"], row["pair_loop_ci"] = statistics.median(ratios), median_interval(ratios)
                row["bench_pp"] = llama_bench(args.llama_cpp_bin / "llama-bench", path, args.threads, prompt=512,
                                              repetitions=3)["pp"]
                loop = rates["loop"]
            else:
                worker = Worker("loop", path, args.threads, args.tokens)
                loop = [worker.measure() for _ in range(2 * args.rounds)]
                worker.close()
            row["decode_loop"] = statistics.median(loop)
            row["lcp_single"] = statistics.median(
                baseline_in_fresh_process(path, args.threads, args.tokens, args.rounds))
            row.update(measure(models_dir, name, path, args))
            rows.append(row)
            print(json.dumps(row), flush=True)

    def ratio(row: dict, a: str, b: str) -> str:
        return f"{row[a] / row[b]:.2f}" if a in row and b in row and row[b] else "n/a"

    def value(row: dict, key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(row[key]) if key in row else "n/a"

    def paired(row: dict, key: str) -> str:
        """The median of the rounds' own ratios, with its 95% confidence interval."""
        if key not in row:
            return "n/a"
        low, high = row[f"{key}_ci"]
        return f"{row[key]:.2f} [{low:.2f}, {high:.2f}]"

    print("\nGeneration, tokens per second (single stream unless noted):\n")
    print("| model | llama-bench tg128 | llama-server 1 stream | llama-cpp-python in-process | Hearth decode loop alone | "
          "Hearth runner while serving | Hearth HTTP 1 stream | loop alone / tg128 | same, median of rounds' ratios [95% CI] | "
          "HTTP / llama-server | same, median of rounds' ratios [95% CI] | HTTP / llama-cpp-python |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {value(r, 'bench_tg')} | {value(r, 'server_single')} | {value(r, 'lcp_single')} | "
              f"{value(r, 'decode_loop')} | {value(r, 'single_runner')} | {value(r, 'single_http')} | "
              f"{ratio(r, 'decode_loop', 'bench_tg')} | {paired(r, 'pair_loop')} | "
              f"{ratio(r, 'single_http', 'server_single')} | "
              f"{paired(r, 'pair_single')} | {ratio(r, 'single_http', 'lcp_single')} |")
    print("\nConcurrent streams, aggregate generation tokens per second:\n")
    print("| model | Hearth 1 | Hearth 2 | Hearth 4 | Hearth 8 | llama-server --parallel 4, 4 streams | "
          "Hearth 4 / Hearth single stream | Hearth 4 / llama-server 4 | same, median of rounds' ratios [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {value(r, 'agg1')} | {value(r, 'agg2')} | {value(r, 'agg4')} | {value(r, 'agg8')} | "
              f"{value(r, 'server_agg4')} | {ratio(r, 'agg4', 'single_http')} | {ratio(r, 'agg4', 'server_agg4')} | "
              f"{paired(r, 'pair_agg4')} |")
    print("\nPrompts:\n")
    print("| model | llama-bench pp512 | Hearth prompt tok/s | Hearth TTFT, short prompt | "
          "long prompt tokens | TTFT first | TTFT repeated | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {value(r, 'bench_pp')} | {value(r, 'prompt_tps')} | "
              f"{value(r, 'ttft_short', '{:.3f} s')} | {r['long_prompt_tokens']} | {r['long_first']:.3f} s | "
              f"{r['long_second']:.3f} s | {r['long_first'] / r['long_second']:.1f}x |")


if __name__ == "__main__":
    main()
