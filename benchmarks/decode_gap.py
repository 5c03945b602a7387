"""Where a step of Hearth's llama.cpp decode loop goes: inside `llama_decode`, or in the Python between two calls.

Runs the decode loop alone in this process (no gRPC, no HTTP), fed to an event loop as the runner feeds its gRPC
replies, with one or more greedy streams of --tokens tokens each. `llama_decode` is wrapped to time each call; the
gap is the time from one call's return to the next call (sampling, detokenizing, stop strings, handing the text
on). Only steps where every stream is generating count (not the prompts). Prints, per round: the streams'
aggregate rate, the median decode time and the mean and median gap, and the gap's share of a step.

    .venv/bin/python benchmarks/decode_gap.py --model smollm2-135m-instruct --streams 1 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp.llama_cpp as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, install

from hearth.backends.base import GenerationSpec, LoadSpec, Sampling
from hearth.backends.llama_cpp import Backend

calls: list[tuple[float, float, int]] = []  # (start, end, tokens in the batch) of each llama_decode
_decode = L.llama_decode


def _timed_decode(ctx: object, batch: L.llama_batch) -> int:
    start = time.perf_counter()
    result = _decode(ctx, batch)
    calls.append((start, time.perf_counter(), batch.n_tokens))
    return result


async def _streams(backend: Backend, n: int, tokens: int) -> float:
    async def one(i: int) -> int:
        spec = GenerationSpec(prompt=f"{PROMPT} Story {i}.", prompt_tokens=None, max_tokens=tokens, ignore_eos=True,
                              sampling=Sampling(temperature=0))
        async for chunk in backend.agenerate(spec):
            if chunk.finish_reason:
                return chunk.completion_tokens
        raise RuntimeError("the generation ended without its final chunk")

    start = time.perf_counter()
    produced = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(produced) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    L.llama_decode = _timed_decode  # the scheduler calls it through the module
    with tempfile.TemporaryDirectory() as tmp:
        path = install(Path(tmp), args.model)
        backend = Backend()
        backend.load(LoadSpec(model_name="gap", backend="llama-cpp", model_path=str(path), config={},
                              threads=args.threads, context_size=max(2048 // max(args.streams, 1), 1024),
                              parallel=max(args.streams, 1)))
        try:
            asyncio.run(_streams(backend, args.streams, 8))  # warm up
            print(f"{args.model}, {args.streams} stream(s) of {args.tokens} tokens, threads={args.threads}")
            for _ in range(args.rounds):
                calls.clear()
                rate = asyncio.run(_streams(backend, args.streams, args.tokens))
                full = {i for i, call in enumerate(calls) if call[2] == args.streams}
                decode = [calls[i][1] - calls[i][0] for i in sorted(full)]
                gaps = [calls[i + 1][0] - calls[i][1] for i in sorted(full) if i + 1 in full]
                step = statistics.mean(decode) + statistics.mean(gaps)
                print(f"  {rate:7.1f} tok/s  decode median {statistics.median(decode) * 1e3:6.2f} ms  "
                      f"gap mean {statistics.mean(gaps) * 1e6:5.0f} us, median {statistics.median(gaps) * 1e6:5.0f} "
                      f"us  ({statistics.mean(gaps) / step:.1%} of a step)", flush=True)
        finally:
            backend.close()


if __name__ == "__main__":
    main()
