"""The runners that are not llama.cpp, on a busy machine: seconds per request for speech (Piper, onnxruntime),
transcription (faster-whisper, CTranslate2; and whisper.cpp when its ggml file is given) and embeddings
(sentence-transformers on onnxruntime, and on torch), quiet and beside other processes, all with 2 threads.

    python benchmarks/busy_runners.py [--whisper-ggml ~/.cache/hearth/whisper-ggml/ggml-tiny.en.bin]

A model that gives up the core it cannot have takes about twice its quiet time; one whose threads spin for a
partner that is not running takes many times that. `--no-adapt` starts the server with HEARTH_ADAPT_THREADS=0,
for a before-and-after in one run (`--both` runs both, alternating by round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from busy_machine import LOADS, start_load
from common import machine_line, start_hearth, stop

from hearth.gallery.builtin import install
from hearth.settings import default_cache_dir

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet green forest."
TEXTS = [f"{SENTENCE} Sentence number {i}." for i in range(32)]


def models_dir(whisper_ggml: Path | None) -> Path:
    models = Path(tempfile.mkdtemp())
    for name in ("whisper-tiny.en", "en_US-joe-medium", "all-minilm-l6-v2"):
        install(name, models, default_cache_dir())
    torch_copy = models / "minilm-torch"  # the same model without its ONNX file runs on torch
    shutil.copytree(models / "all-minilm-l6-v2", torch_copy, ignore=shutil.ignore_patterns("onnx"))
    (models / "minilm-torch.yaml").write_text("name: minilm-torch\nbackend: sentencetransformers\n"
                                              "parameters:\n  model: minilm-torch\nembeddings: true\n")
    if whisper_ggml:
        shutil.copyfile(whisper_ggml, models / whisper_ggml.name)  # links out of the models directory are refused
        (models / "whisper-cpp.yaml").write_text(
            f"name: whisper-cpp\nbackend: whisper\nparameters:\n  model: {whisper_ggml.name}\n")
    return models


def workloads(base: str, client: httpx.Client, whisper_ggml: bool) -> dict:
    speech = client.post(f"{base}/v1/audio/speech", json={"model": "en_US-joe-medium", "input": SENTENCE,
                                                          "response_format": "wav"})
    speech.raise_for_status()
    audio = speech.content

    def transcribe(model: str) -> None:
        client.post(f"{base}/v1/audio/transcriptions", data={"model": model},
                    files={"file": ("s.wav", audio, "audio/wav")}).raise_for_status()

    jobs = {
        "speech (piper, onnxruntime)": lambda: client.post(f"{base}/v1/audio/speech", json={
            "model": "en_US-joe-medium", "input": SENTENCE, "response_format": "wav"}).raise_for_status(),
        "transcription (faster-whisper tiny.en)": lambda: transcribe("whisper-tiny.en"),
        "embeddings x32 (MiniLM, onnxruntime)": lambda: client.post(f"{base}/v1/embeddings", json={
            "model": "all-minilm-l6-v2", "input": TEXTS}).raise_for_status(),
        "embeddings x32 (MiniLM, torch)": lambda: client.post(f"{base}/v1/embeddings", json={
            "model": "minilm-torch", "input": TEXTS}).raise_for_status(),
    }
    if whisper_ggml:
        jobs["transcription (whisper.cpp tiny.en)"] = lambda: transcribe("whisper-cpp")
    return jobs


def timed(job) -> float:
    started = time.perf_counter()
    job()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--whisper-ggml", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", nargs="+", default=["none", "busy nice 0", "busy nice 19"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-adapt", action="store_true")
    group.add_argument("--both", action="store_true")
    args = parser.parse_args()
    models = models_dir(args.whisper_ggml)
    print(machine_line(threads=2, rounds=args.rounds))
    kinds = ["adapting", "fixed"] if args.both else ["fixed" if args.no_adapt else "adapting"]
    servers = {}
    for kind in kinds:
        os.environ["HEARTH_ADAPT_THREADS"] = "1" if kind == "adapting" else "0"
        servers[kind] = start_hearth(models, 2)
    client = httpx.Client(timeout=600)
    try:
        jobs = {kind: workloads(base, client, bool(args.whisper_ggml)) for kind, (_, base) in servers.items()}
        for kind in kinds:  # warm: load every model
            for job in jobs[kind].values():
                job()
        print("| work | load | " + " | ".join(f"{kind} (s)" for kind in kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for work in jobs[kinds[0]]:
            for load in args.loads:
                times: dict[str, list[float]] = {kind: [] for kind in kinds}
                for round_ in range(args.rounds):
                    order = kinds if round_ % 2 == 0 else kinds[::-1]
                    for kind in order:
                        others = start_load(LOADS[load])
                        time.sleep(0.5)
                        try:
                            times[kind].append(timed(jobs[kind][work]))
                        finally:
                            for process in others:
                                process.kill()
                                process.wait()
                print(f"| {work} | {load} | " + " | ".join(f"{statistics.median(times[k]):.2f}" for k in kinds)
                      + " |", flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
