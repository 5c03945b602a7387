"""Single-stream generation speed: Hearth over HTTP versus llama-cpp-python in-process, as ratios in one run.

    python benchmarks/single_stream.py [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct]
                                       [--threads 2] [--tokens 128] [--rounds 3]

Both sides run the same GGUF with the same thread count, greedy, generating exactly --tokens tokens (end of
sequence ignored). The rounds alternate between the two so that drift in the machine's speed hits both alike.
Hearth's rate is measured by the client from the first streamed token to the last (HTTP, SSE, the API process
and the runner process all included); the runner's own measurement is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hearth.gallery.builtin import BUILTIN  # noqa: E402
from hearth.gallery.pypi import fetch_to_cache, place  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
CACHE = Path(os.environ.get("HEARTH_CACHE_DIR", Path.home() / ".cache" / "hearth"))


def baseline_rate(path: Path, threads: int, tokens: int) -> float:
    """llama-cpp-python's high-level API, in this process: tokens per second after the first token."""
    from llama_cpp import Llama

    llm = _LLMS.get(path)
    if llm is None:
        llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        _LLMS[path] = llm
    llm.reset()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    started = 0.0
    for produced, _token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 1):
        if produced == 1:
            started = time.perf_counter()
        if produced == tokens:
            break
    return (tokens - 1) / (time.perf_counter() - started)


_LLMS: dict[Path, object] = {}


def hearth_rate(base_url: str, model: str, tokens: int) -> tuple[float, float]:
    """(client-observed tok/s over HTTP, the runner's own tok/s) for one streamed completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    first = last = 0.0
    pieces = 0
    runner_rate = 0.0
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                pieces += 1
                if pieces == 1:
                    first = now
                last = now
            if chunk.get("timings"):
                runner_rate = chunk["timings"]["predicted_per_second"]
            if chunk.get("usage"):
                assert chunk["usage"]["completion_tokens"] == tokens, chunk["usage"]
    # One streamed piece per token, except where a multi-byte character spans tokens.
    return (pieces - 1) / (last - first), runner_rate


def start_hearth(models_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    process = subprocess.Popen(
        [sys.executable, "-m", "hearth", "serve", "--models-dir", str(models_dir), "--port", str(port),
         "--threads", str(threads), "--log-level", "warning"], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("hearth did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        for name in args.models:
            spec = BUILTIN[name]
            place(fetch_to_cache(spec.file, CACHE), models_dir / spec.file.filename)
            (models_dir / f"{name}.yaml").write_text(
                f"name: {name}\nbackend: llama-cpp\ncontext_size: 2048\nparameters:\n  model: {spec.file.filename}\n")
        process, base = start_hearth(models_dir, args.threads)
        try:
            print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, threads={args.threads}, tokens={args.tokens}, rounds={args.rounds}")
            print("| model | llama-cpp-python in-process tok/s | Hearth over HTTP tok/s | Hearth runner tok/s | "
                  "ratio HTTP / in-process |")
            print("|---|---|---|---|---|")
            for name in args.models:
                path = models_dir / BUILTIN[name].file.filename
                hearth_rate(base, name, 8)  # load the runner and warm up
                baseline_rate(path, args.threads, 8)
                base_rates, http_rates, runner_rates = [], [], []
                for _ in range(args.rounds):
                    base_rates.append(baseline_rate(path, args.threads, args.tokens))
                    http, runner = hearth_rate(base, name, args.tokens)
                    http_rates.append(http)
                    runner_rates.append(runner)
                b, h, r = (statistics.median(x) for x in (base_rates, http_rates, runner_rates))
                print(f"| {name} | {b:.1f} | {h:.1f} | {r:.1f} | {h / b:.3f} |", flush=True)
                _LLMS.clear()
        finally:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
