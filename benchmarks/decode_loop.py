"""Hearth's decode loop alone against llama.cpp's `llama-bench` tg128, in many short pairs.

The batching issue's target is the runner's decode loop alone (timed inside the runner, no HTTP) at 0.95 times or more of
`llama-bench` tg128. On this machine kind one 128-token measurement drifts by 5 to 10% from the next, more than the
margin being measured, so a few long runs cannot settle it. This script takes many short pairs instead:

- Hearth's decode loop runs in one long-lived process of its own, as in the runner: the backend is loaded once and
  each measurement is one greedy 128-token stream fed to an event loop, timed by the loop's own `timings`
  (first token to last).
- `llama-bench -p 0 -n 128 -r 1` runs in a fresh process for each measurement (its own warm-up included).
- With --bare, a plain loop of `llama_decode` calls through llama-cpp-python's bindings (one token a step, no
  sampling, nothing else) runs in a third long-lived process. It shows how much of any gap is Python calling
  llama.cpp at all, or a difference between llama-cpp-python's build of llama.cpp and the one `llama-bench` uses,
  rather than Hearth's own work between two decodes.
- With --serve, Hearth (`parallel: 8`) and `llama-server --parallel 4` run too, and each pair also takes one
  streamed 128-token completion from each, timed by the client (first token to last): what the HTTP path costs
  against the loop alone, and Hearth against llama.cpp's own server. Hearth reads a small model's weights into
  memory, where llama.cpp's tools map the file by default; --server-in-memory adds a `llama-server --load-mode none`
  (weights read in, as Hearth does) beside the default one.

Each pair runs back to back, the order alternating, and the idle processes wait on a pipe, taking no CPU. For each
model the script prints the medians, the median of the pairs' own ratios and a distribution-free 95% confidence
interval for that median (order statistics), and how many pairs reached 0.95.

    .venv/bin/python benchmarks/decode_loop.py --llama-cpp-bin /tmp/lcpbuild/bin --pairs 16 --bare [--serve]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PROMPT,
    decode_loop_rate,
    generation_arguments,
    install,
    llama_bench,
    machine_line,
    start_hearth,
    start_llama_server,
    stop,
    stream_completion,
)

from hearth.runtime.process import runner_environment

SETTLE = 0.3  # seconds between two measurements: lets the last one's OpenMP threads stop spinning


def bare_rate(path: Path, threads: int, tokens: int, cache: dict) -> float:
    """A plain `llama_decode` loop through llama-cpp-python's bindings, as `llama-bench` tg runs it: one token a
    step from an empty cache, the context set up as Hearth's decode loop sets it up (2,048 tokens, one sequence)."""
    import llama_cpp.llama_cpp as L

    if path not in cache:
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        model = L.llama_model_load_from_file(str(path).encode(), params)
        cparams = L.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 2048, 512, 512, 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        ctx = L.llama_init_from_model(model, cparams)
        cache[path] = (model, ctx, L.llama_batch_init(1, 0, 1), L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
    _, ctx, batch, n_vocab = cache[path]
    L.llama_memory_seq_rm(L.llama_get_memory(ctx), -1, -1, -1)
    start = time.perf_counter()
    for i in range(tokens):
        batch.n_tokens = 1
        batch.token[0] = (i * 7919) % n_vocab
        batch.pos[0] = i
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        L.llama_get_logits_ith(ctx, -1)
    return tokens / (time.perf_counter() - start)


def worker(kind: str, path: Path, threads: int, tokens: int) -> None:
    """Load once, warm up, then answer each line on stdin with one measurement on stdout."""
    fn = bare_rate if kind == "bare" else decode_loop_rate
    cache: dict = {}
    fn(path, threads, 8, cache)
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(fn(path, threads, tokens, cache)), flush=True)


class Worker:
    def __init__(self, kind: str, path: Path, threads: int, tokens: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(path), str(threads), str(tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=runner_environment(os.environ) if kind == "loop" else None)  # the loop as the server starts a runner
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {kind} worker did not start")

    def measure(self) -> float:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median: the k-th smallest and k-th largest values, with k the
    largest rank whose binomial tail stays within (1 - confidence) / 2."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n
        if tail > (1 - confidence) / 2:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def paired_rates(bench: Path, path: Path, threads: int, tokens: int, pairs: int, bare: bool = False,
                 label: str = "", servers: dict[str, tuple[str, str]] | None = None) -> dict[str, list[float]]:
    """`pairs` rounds of `llama-bench` tg and Hearth's decode loop (and the plain loop, and one stream from each
    of `servers`: name -> (base URL, model)), back to back, the order alternating; tokens per second of each."""
    workers = {"loop": Worker("loop", path, threads, tokens)}
    if bare:
        workers["bare"] = Worker("bare", path, threads, tokens)
    servers = servers or {}
    for base, model in servers.values():
        stream_completion(base, model, "warm up", 8)
    rates: dict[str, list[float]] = {"bench": [], **{kind: [] for kind in [*workers, *servers]}}
    try:
        for pair in range(pairs):
            order = ["bench", *workers, *servers]
            for kind in order if pair % 2 == 0 else reversed(order):
                time.sleep(SETTLE)
                if kind == "bench":
                    rates[kind].append(llama_bench(bench, path, threads, gen=tokens)["tg"])
                elif kind in workers:
                    rates[kind].append(workers[kind].measure())
                else:
                    rates[kind].append(stream_completion(*servers[kind], PROMPT, tokens).rate)
            print(json.dumps({"model": label or path.name, "pair": pair,
                              **{kind: round(values[-1], 1) for kind, values in rates.items()}}), flush=True)
    finally:
        for each in workers.values():
            each.close()
    return rates


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, path, threads, tokens = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        return worker(kind, path, threads, tokens)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generation_arguments(parser, "folder with llama-bench", required=True)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--bare", action="store_true", help="also time a plain llama_decode loop in Python")
    parser.add_argument("--serve", action="store_true", help="also time one stream from Hearth and llama-server")
    parser.add_argument("--server-in-memory", action="store_true",
                        help="with --serve, also time llama-server with its weights read into memory")
    args = parser.parse_args()

    print(machine_line(threads=args.threads, tokens=args.tokens, pairs=args.pairs) + "\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = install(Path(tmp), name, parallel=8, context_size=2048)
            processes, servers = [], {}
            try:
                if args.serve:
                    hearth, base = start_hearth(Path(tmp), args.threads)
                    processes.append(hearth)
                    servers["http"] = (base, name)
                    server, base = start_llama_server(args.llama_cpp_bin / "llama-server", path, args.threads)
                    processes.append(server)
                    servers["server"] = (base, name)
                    if args.server_in_memory:
                        server, base = start_llama_server(args.llama_cpp_bin / "llama-server", path, args.threads,
                                                          "--load-mode", "none")
                        processes.append(server)
                        servers["server-in-memory"] = (base, name)
                rows.append((name, paired_rates(args.llama_cpp_bin / "llama-bench", path, args.threads, args.tokens,
                                                args.pairs, args.bare, name, servers)))
            finally:
                for process in processes:
                    stop(process)

    columns = [("loop", "bench", "Hearth loop / tg128")]
    if args.bare:
        columns.append(("bare", "bench", "plain llama_decode loop / tg128"))
    if args.serve:
        columns += [("http", "loop", "Hearth HTTP / Hearth loop"), ("http", "server", "Hearth HTTP / llama-server"),
                    ("server", "bench", "llama-server / tg128")]
        if args.server_in_memory:
            columns.append(("http", "server-in-memory", "Hearth HTTP / llama-server weights in memory"))
    print("\nTokens per second, medians of the pairs:\n")
    kinds = list(rows[0][1]) if rows else []
    labels = {"bench": "llama-bench tg128", "loop": "Hearth loop alone", "bare": "plain llama_decode loop",
              "http": "Hearth HTTP 1 stream", "server": "llama-server 1 stream",
              "server-in-memory": "llama-server weights in memory 1 stream"}
    print("| model | " + " | ".join(labels[kind] for kind in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, rates in rows:
        print(f"| {name} | " + " | ".join(f"{statistics.median(rates[kind]):.1f}" for kind in kinds) + " |")
    print("\nMedians of the pairs' own ratios [95% confidence interval] (pairs at or above 0.95):\n")
    print("| model | " + " | ".join(title for _, _, title in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, rates in rows:
        cells = []
        for a, b, _ in columns:
            ratios = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
            low, high = median_interval(ratios)
            cells.append(f"{statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}] "
                         f"({sum(r >= 0.95 for r in ratios)} of {len(ratios)})")
        print(f"| {name} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
