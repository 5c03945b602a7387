"""Speculative decoding: Hearth beside llama.cpp's `llama-server`, same GGUFs and draft settings, rounds alternating.

Target Qwen2.5-Coder-1.5B; guesses from Qwen2.5-Coder-0.5B (a draft model: Hearth's `draft_model:`, llama-server's
`-md`), from the sequence itself (n-gram lookup: `spec_type:ngram-simple`, llama-server's `--spec-type
ngram-simple`), or both (lookup first, the draft where it finds nothing: `ngram-simple,draft-simple` in both); and
plain decoding for each. Two prompts: prose, and a code edit (a 60-line function asked back with
one change). Greedy, one stream; then several streams of the code edit at once (`--streams`, default 4), with and
without speculation.

    python benchmarks/speculative.py --llama-cpp-bin /tmp/lcpbuild/bin [--rounds 3] [--tokens 192]

Rates are the servers' own `timings.predicted_per_second` (tokens after the first over their time), with the
guessed and kept tokens (`draft_n`, `draft_n_accepted`); several streams: completion tokens over the wall time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import install, machine_line, start_hearth, start_llama_server, stop

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"

FUNCTION = '''def summarize_orders(orders, customers, start=None, end=None, currency="EUR"):
    """Totals per customer and per month for the orders between start and end."""
    by_customer = {}
    by_month = {}
    skipped = []
    for order in orders:
        placed = order.get("placed")
        if placed is None:
            skipped.append((order.get("id"), "no date"))
            continue
        if start is not None and placed < start:
            continue
        if end is not None and placed >= end:
            continue
        customer_id = order.get("customer")
        customer = customers.get(customer_id)
        if customer is None:
            skipped.append((order.get("id"), "unknown customer"))
            continue
        amount = 0.0
        for line in order.get("lines", []):
            quantity = line.get("quantity", 1)
            price = line.get("price", 0.0)
            discount = line.get("discount", 0.0)
            if quantity <= 0:
                skipped.append((order.get("id"), "bad quantity"))
                continue
            amount += quantity * price * (1.0 - discount)
        if order.get("currency", currency) != currency:
            rate = order.get("rate")
            if not rate:
                skipped.append((order.get("id"), "no exchange rate"))
                continue
            amount *= rate
        month = placed.strftime("%Y-%m")
        entry = by_customer.setdefault(customer_id, {"name": customer["name"], "total": 0.0, "orders": 0})
        entry["total"] += amount
        entry["orders"] += 1
        by_month[month] = by_month.get(month, 0.0) + amount
    ranked = sorted(by_customer.items(), key=lambda item: item[1]["total"], reverse=True)
    best = ranked[0][0] if ranked else None
    average = 0.0
    if by_customer:
        average = sum(entry["total"] for entry in by_customer.values()) / len(by_customer)
    report = {
        "currency": currency,
        "customers": dict(ranked),
        "months": dict(sorted(by_month.items())),
        "best_customer": best,
        "average_per_customer": round(average, 2),
        "skipped": skipped,
    }
    if start is not None:
        report["from"] = start.isoformat()
    if end is not None:
        report["until"] = end.isoformat()
    return report
'''
PROMPTS = {
    "prose": "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "code edit": "Here is a Python function:\n\n```python\n" + FUNCTION + "```\n\nRewrite it with the parameter "
                 "`currency` renamed to `target_currency` everywhere. Answer with the whole function only.",
}


def ask(base: str, model: str, prompt: str, tokens: int) -> dict:
    response = httpx.post(f"{base}/v1/chat/completions", timeout=900, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0})
    response.raise_for_status()
    return response.json()


def one_stream(base: str, model: str, prompt: str, tokens: int) -> tuple[float, int, int]:
    """(tokens/s after the first, as the server timed them; tokens guessed; guesses kept)."""
    timings = ask(base, model, prompt, tokens)["timings"]
    return timings["predicted_per_second"], timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)


def streams_at_once(base: str, model: str, prompt: str, tokens: int, streams: int) -> float:
    """Completion tokens of several requests at once over their wall time."""
    counts: list[int] = []
    variants = [prompt + f" (Request {i + 1}.)" for i in range(streams)]
    threads = [threading.Thread(target=lambda p=p: counts.append(
        ask(base, model, p, tokens)["usage"]["completion_tokens"])) for p in variants]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def requantize_q4_0(path: Path) -> Path:
    """The draft again in Q4_0, output and token embeddings included (the shipped file keeps them in Q8_0 and Q5_0):
    llama.cpp's CPU kernels run Q4_0 fastest, and a draft's cost per guess is what speculation must win back."""
    import llama_cpp.llama_cpp as L

    out = path.with_name(path.stem + "-q4_0.gguf")
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0
    params.output_tensor_type = params.token_embedding_type = 2  # GGML_TYPE_Q4_0
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if L.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"could not requantize {path.name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp-bin", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draft-max", type=int, default=6)
    parser.add_argument("--draft-p-min", type=float, default=0.5)
    parser.add_argument("--ngram-max", type=int, default=48)
    parser.add_argument("--ngram-n", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None, help="spec_max_batch (default: Hearth's)")
    parser.add_argument("--streams", type=int, nargs="*", default=[4], help="streams at once, after one stream")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--kinds", nargs="+", default=["plain", "draft", "ngram", "both"],
                        choices=["plain", "draft", "ngram", "both"])
    parser.add_argument("--draft-q4-0", action="store_true",
                        help="guess with the draft requantized to Q4_0 throughout (output and embeddings too)")
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp())
    target = install(models, TARGET, parallel=4, context_size=4096)
    draft = install(models, DRAFT)
    (models / f"{DRAFT}.yaml").unlink()  # only its file: the draft is named by file
    if args.draft_q4_0:
        draft = requantize_q4_0(draft)
    base_yaml = (models / f"{TARGET}.yaml").read_text()
    batch = [f"  - spec_max_batch:{args.max_batch}"] if args.max_batch else []
    variants = {
        "draft": [f"draft_model: {draft.name}", "options:", f"  - spec_n_max:{args.draft_max}",
                  f"  - spec_p_min:{args.draft_p_min}", *batch],
        "ngram": ["options:", "  - spec_type:ngram-simple", f"  - spec_n_max:{args.ngram_max}",
                  f"  - spec_ngram_size_n:{args.ngram_n}", *batch],
        "both": [f"draft_model: {draft.name}", "options:", "  - spec_type:ngram-simple,draft-simple",
                 f"  - spec_n_max:{args.ngram_max}", f"  - spec_ngram_size_n:{args.ngram_n}",
                 f"  - spec_p_min:{args.draft_p_min}", *batch],
    }
    for kind, lines in variants.items():
        text = base_yaml.replace(f"name: {TARGET}", f"name: {TARGET}-{kind}") + "\n".join(lines) + "\n"
        (models / f"{TARGET}-{kind}.yaml").write_text(text)
    print(machine_line(target=TARGET, draft=DRAFT, threads=args.threads, tokens=args.tokens, rounds=args.rounds,
                       draft_max=args.draft_max, draft_p_min=args.draft_p_min, ngram_max=args.ngram_max,
                       ngram_n=args.ngram_n, max_batch=args.max_batch or "default",
                       draft_file=draft.name))
    hearth, hearth_base = start_hearth(models, args.threads)
    binary = args.llama_cpp_bin / "llama-server"
    draft_args = ["-md", str(draft), "--spec-draft-n-max", str(args.draft_max), "--spec-draft-p-min",
                  str(args.draft_p_min), "-td", str(args.threads), "-tbd", str(args.threads)]
    ngram_args = ["--spec-ngram-simple-size-n", str(args.ngram_n), "--spec-ngram-simple-size-m", str(args.ngram_max)]
    flags = {"plain": [], "draft": ["--spec-type", "draft-simple", *draft_args],
             "ngram": ["--spec-type", "ngram-simple", *ngram_args],
             "both": ["--spec-type", "ngram-simple,draft-simple", *draft_args, *ngram_args]}
    servers = {kind: start_llama_server(binary, target, args.threads, *extra) for kind, extra in flags.items()
               if kind in args.kinds}
    runs = [(f"Hearth {kind}", hearth_base, TARGET if kind == "plain" else f"{TARGET}-{kind}")
            for kind in ("plain", "draft", "ngram", "both") if kind in args.kinds]
    runs += [(f"llama-server {kind}", base, TARGET) for kind, (_, base) in servers.items()]
    try:
        for _, base, model in runs:  # load and warm each
            ask(base, model, "Hello", 4)
        print("| prompt | " + " | ".join(name for name, _, _ in runs) + " |")
        print("|---|" + "---|" * len(runs))
        for label in args.prompts:
            prompt = PROMPTS[label]
            results: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _, _ in runs}
            for round_ in range(args.rounds):
                order = runs if round_ % 2 == 0 else runs[::-1]
                for name, base, model in order:
                    results[name].append(one_stream(base, model, prompt, args.tokens))
            cells = []
            for name, _, _ in runs:
                rate = statistics.median(r[0] for r in results[name])
                drafted, kept = sum(r[1] for r in results[name]), sum(r[2] for r in results[name])
                cells.append(f"{rate:.1f}" + (f" ({kept}/{drafted})" if drafted else ""))
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        hearth_runs = [run for run in runs if run[0].startswith("Hearth")]
        for streams in args.streams:
            rates: dict[str, list[float]] = {name: [] for name, _, _ in hearth_runs}
            for round_ in range(args.rounds):
                for name, base, model in (hearth_runs if round_ % 2 == 0 else hearth_runs[::-1]):
                    rates[name].append(streams_at_once(base, model, PROMPTS["code edit"], args.tokens, streams))
            print(f"\n{streams} streams of the code edit at once, tokens/s over the wall time: " + ", ".join(
                f"{name} {statistics.median(r):.1f}" for name, r in rates.items()), flush=True)
    finally:
        stop(hearth)
        for process, _ in servers.values():
            stop(process)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
