"""Embeddings speed: Hearth over HTTP versus sentence-transformers in-process, sentences per second, in one run.

    python benchmarks/embeddings.py [--threads 2] [--rounds 3] [--batches 1 16 128]

Sentences per second. Both sides embed the same sentences (a mix of lengths, 8 to 60 tokens) with all-MiniLM-L6-v2 and the same thread
count. Hearth runs the default install (int8 ONNX with onnxruntime, in its runner process, behind the HTTP API
and gRPC), and the same model without its ONNX file, which Hearth runs with sentence-transformers on torch, as
the baseline does; the baseline is sentence-transformers' `encode` on the float32 torch model, in a fresh process of its
own. A batch of N is one request of N inputs (Hearth) or one `encode` call of N sentences (baseline). The rounds
alternate between the two and the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import CACHE, ROOT, machine_line, start_hearth, stop

from hearth.gallery.builtin import install

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "the", "river", "runs", "past", "old", "stone", "bridges", "and", "quiet", "gardens", "full", "of", "birds", "singing", "in", "the", "early", "morning", "light", "of", "a", "long", "summer", "day"]


def sentences(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + (i * 13) % 48)) + "." for i in range(n)]


BASELINE = """
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
folder, threads, batches, rounds = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
texts = json.loads(sys.stdin.read())
torch.set_num_threads(threads)
model = SentenceTransformer(folder, device="cpu")
model.encode(texts[:8])
out = {}
for batch in batches:
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = 0
        while done < len(texts):
            model.encode(texts[done:done + batch], batch_size=batch)
            done += batch
        rates.append(len(texts) / (time.perf_counter() - started))
    out[batch] = rates
print(json.dumps(out))
"""


def baseline(folder: Path, threads: int, batches: list[int], rounds: int, texts: list[str]) -> dict[int, list[float]]:
    result = subprocess.run([sys.executable, "-c", BASELINE, str(folder), str(threads), json.dumps(batches),
                             str(rounds)], input=json.dumps(texts), capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def torch_copy(models_dir: Path) -> None:
    """The same model without its ONNX file, which Hearth then runs with sentence-transformers on torch."""
    source, target = models_dir / "all-minilm-l6-v2", models_dir / "minilm-torch"
    for path in source.rglob("*"):
        if path.is_file() and path.suffix != ".onnx":
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target / path.relative_to(source))
    (models_dir / "minilm-torch.yaml").write_text(
        "name: minilm-torch\nbackend: sentencetransformers\nparameters:\n  model: minilm-torch\n")


def hearth_rate(base: str, batch: int, texts: list[str], model: str = "all-minilm-l6-v2") -> float:
    with httpx.Client(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        for start in range(0, len(texts), batch):
            response = client.post("/v1/embeddings", json={"model": model, "input": texts[start:start + batch]})
            response.raise_for_status()
        return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--sentences", type=int, default=512)
    args = parser.parse_args()
    texts = sentences(args.sentences)

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        install("all-minilm-l6-v2", models_dir, CACHE)
        torch_copy(models_dir)
        process, base = start_hearth(models_dir, args.threads)
        try:
            hearth_rate(base, 16, texts[:32])  # load the models, warm up
            hearth_rate(base, 16, texts[:32], "minilm-torch")
            ours: dict[int, list[float]] = {b: [] for b in args.batches}
            ours_torch: dict[int, list[float]] = {b: [] for b in args.batches}
            theirs: dict[int, list[float]] = {b: [] for b in args.batches}
            for _ in range(args.rounds):
                for batch in args.batches:
                    ours[batch].append(hearth_rate(base, batch, texts))
                    ours_torch[batch].append(hearth_rate(base, batch, texts, "minilm-torch"))
                for batch, rates in baseline(models_dir / "all-minilm-l6-v2", args.threads, args.batches, 1,
                                             texts).items():
                    theirs[batch] += rates
        finally:
            stop(process)

    print(machine_line(threads=args.threads, sentences=args.sentences, rounds=args.rounds))
    print("| batch | sentence-transformers in-process (torch fp32) | Hearth HTTP, default (ONNX int8) | ratio | "
          "Hearth HTTP, same torch fp32 path | ratio |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        reference = statistics.median(theirs[batch])
        mine, mine_torch = statistics.median(ours[batch]), statistics.median(ours_torch[batch])
        print(f"| {batch} | {reference:.1f} | {mine:.1f} | {mine / reference:.2f} | {mine_torch:.1f} | "
              f"{mine_torch / reference:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
