"""Four concurrent streams: Hearth versus `llama-server --parallel 4`, enough paired rounds to tell them apart.

    python benchmarks/four_streams.py --llama-cpp-bin DIR [--models ...] [--rounds 30] [--streams 4]

Issue 3's target is an aggregate rate at four streams of at least llama-server's. Both drive the same ggml kernels,
so the two land within a few percent of each other, and one round's ratio moves by more than that with the state of
this machine. This script measures only that comparison, so that many rounds fit in one run: each round sends the
same `--streams` greedy streams of `--tokens` tokens (end of sequence ignored) to each server, back to back, which
one goes first alternating by round, and takes the ratio of the two aggregate rates (completion tokens over the
wall time from the first request sent to the last token received, prompts included). It reports the median of the
rounds' ratios with a distribution-free 95% confidence interval, and how many rounds Hearth won.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common
from decode_loop import median_interval


def compare(models_dir: Path, name: str, path: Path, args: argparse.Namespace) -> dict:
    hearth, hearth_base = common.start_hearth(models_dir, args.threads)
    server, server_base = common.start_llama_server(args.llama_cpp_bin / "llama-server", path, args.threads)
    bases = {"hearth": (hearth_base, name), "server": (server_base, "x")}
    rates: dict[str, list[float]] = {"hearth": [], "server": []}
    ttfts: dict[str, list[float]] = {"hearth": [], "server": []}
    try:
        for base, model in bases.values():
            common.stream_completion(base, model, "warm up", 8)
        for round_ in range(args.rounds):
            for which in ("hearth", "server") if round_ % 2 == 0 else ("server", "hearth"):
                time.sleep(0.3)  # let the other server's last writes settle
                rate, results = common.concurrent_streams(*bases[which], args.streams, args.tokens)
                rates[which].append(rate)
                ttfts[which].append(max(r.ttft for r in results))
            if args.verbose:
                print(f"  {name} round {round_}: Hearth {rates['hearth'][-1]:.1f}, llama-server "
                      f"{rates['server'][-1]:.1f} tok/s", flush=True)
    finally:
        common.stop(hearth)
        common.stop(server)
    ratios = [h / s for h, s in zip(rates["hearth"], rates["server"], strict=True)]
    return {"model": name, "hearth": statistics.median(rates["hearth"]),
            "server": statistics.median(rates["server"]), "ratio": statistics.median(ratios),
            "ci": median_interval(ratios), "wins": sum(r > 1 for r in ratios), "rounds": len(ratios),
            "ttft_hearth": statistics.median(ttfts["hearth"]), "ttft_server": statistics.median(ttfts["server"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.generation_arguments(parser, "folder with llama-server", required=True)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--verbose", action="store_true", help="print every round")
    args = parser.parse_args()

    print(common.machine_line(threads=args.threads, streams=args.streams, tokens=args.tokens, rounds=args.rounds) + "\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = common.install(Path(tmp), name, parallel=8, context_size=2048)
            rows.append(compare(Path(tmp), name, path, args))
    print(f"| model | Hearth {args.streams} streams tok/s | llama-server tok/s | median of rounds' ratios [95% CI] | "
          "rounds Hearth won | slowest first token, Hearth / llama-server |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["ci"]
        print(f"| {r['model']} | {r['hearth']:.1f} | {r['server']:.1f} | {r['ratio']:.3f} [{low:.3f}, {high:.3f}] | "
              f"{r['wins']}/{r['rounds']} | {r['ttft_hearth'] * 1000:.0f} / {r['ttft_server'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
