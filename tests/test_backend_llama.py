"""The llama.cpp backend called directly, in-process, on SmolLM2 (no server, no runner process)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as L
import pytest

import hearth.backends.llama_cpp as llama_backend
from hearth.backends.base import GenerationChunk, GenerationSpec, LoadSpec, Sampling
from hearth.backends.llama_cpp import Backend, maps_weights, sequences_that_fit
from hearth.cores import Board
from hearth.errors import ContextLengthExceeded, InvalidRequest

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def backend(smollm2_file: Path) -> Backend:
    loaded = Backend()
    info = loaded.load(LoadSpec(model_name="smol", backend="llama-cpp", model_path=str(smollm2_file), config={},
                                threads=2, context_size=512, parallel=2))
    assert info.context_size == 512 and info.parallel == 2 and info.train_context_size == 8192 and info.architecture == "llama"
    assert L.llama_n_ctx(loaded.ctx) == 1024, "context_size is each request's: the cache holds it per sequence"
    assert "chat" in info.capabilities and "<|im_start|>" in info.chat_template
    yield loaded
    loaded.close()


def run(backend: Backend, prompt: str, cancel_after: int | None = None, **options) -> list[GenerationChunk]:
    chunks: list[GenerationChunk] = []
    spec = GenerationSpec(prompt=prompt, prompt_tokens=None, parse_special=True,
                          sampling=Sampling(temperature=0), **options)
    for chunk in backend.generate(spec, cancelled=lambda: cancel_after is not None and len(chunks) >= cancel_after):
        chunks.append(chunk)
    return chunks


def test_greedy_generation_and_usage(backend: Backend) -> None:
    chunks = run(backend, "The capital of France is", max_tokens=8)
    final = chunks[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 8
    assert final.prompt_tokens == len(backend.tokenize("The capital of France is", True, True))
    assert "".join(c.text for c in chunks)


def test_prompt_prefix_is_reused_from_the_cache(backend: Backend) -> None:
    history = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"
    first = run(backend, history, max_tokens=4)[-1]
    longer = history + "The sea is big.<|im_end|>\n<|im_start|>user\nAnd rivers?<|im_end|>\n"
    second = run(backend, longer, max_tokens=4)[-1]
    assert first.prompt_tokens < second.prompt_tokens
    assert second.cached_tokens >= len(backend.tokenize(history, True, True)) - 1
    unrelated = run(backend, "Completely different text", max_tokens=2)[-1]
    assert unrelated.cached_tokens == 0


def test_stop_strings_cut_output(backend: Backend) -> None:
    text = "".join(c.text for c in run(backend, "1, 2, 3, 4,", max_tokens=12))
    stop = text.strip().split(",")[1].strip()  # the second number the model writes
    chunks = run(backend, "1, 2, 3, 4,", max_tokens=12, stop=[stop])
    assert chunks[-1].finish_reason == "stop"
    assert stop not in "".join(c.text for c in chunks)


def test_cancellation_stops_without_a_final_chunk(backend: Backend) -> None:
    spec = GenerationSpec(prompt="Once upon a time", prompt_tokens=None, max_tokens=200, ignore_eos=True,
                          sampling=Sampling(temperature=0))
    chunks, counted = [], []
    for chunk in backend.generate(spec, cancelled=lambda: len(chunks) >= 3):
        chunks.append(chunk)
        counted.append(backend.active_requests())
    assert len(chunks) == 3 and all(c.finish_reason is None for c in chunks)
    assert counted == [1, 1, 1], "the request counts as active while it generates"
    deadline = time.monotonic() + 5
    while backend.active_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.active_requests() == 0, "and no longer once its reader has left"


def test_tokens_round_trip_and_bad_ids(backend: Backend) -> None:
    tokens = backend.tokenize("Hello, world! ünïcode", False, False)
    assert backend.detokenize(tokens) == "Hello, world! ünïcode"
    with pytest.raises(InvalidRequest, match="not in the model's vocabulary"):
        backend.detokenize([10**7])
    with pytest.raises(InvalidRequest):
        list(backend.generate(GenerationSpec(prompt=None, prompt_tokens=[-1]), lambda: False))


def test_context_limits(backend: Backend) -> None:
    with pytest.raises(ContextLengthExceeded, match="512 tokens"):
        run(backend, "word " * 600)
    with pytest.raises(ContextLengthExceeded, match="lower max_tokens"):
        run(backend, "hello", max_tokens=1000)
    with pytest.raises(InvalidRequest, match="empty"):
        run(backend, "", add_special=False)


def test_same_prompt_submitted_together_is_computed_once(backend: Backend) -> None:
    """The choices of an n > 1 request arrive together: the second waits for the first to read the prompt, then
    copies its KV entries instead of computing the same prompt again."""
    prompt = "<|im_start|>user\n" + "Tell me a long story about the sea and its ships. " * 6 + "<|im_end|>\n"
    finals: list[GenerationChunk] = []

    def one(seed: int) -> None:
        spec = GenerationSpec(prompt=prompt, prompt_tokens=None, parse_special=True, max_tokens=4,
                              sampling=Sampling(temperature=1, seed=seed))
        finals.append(list(backend.generate(spec, cancelled=lambda: False))[-1])

    run(backend, "Completely unrelated words to fill the slots", max_tokens=1)  # no cache for this prompt
    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    n_prompt = len(backend.tokenize(prompt, True, True))
    assert sorted(f.cached_tokens for f in finals) == [0, n_prompt - 1]


def test_prompts_back_together_in_another_order_find_their_own_caches(backend: Backend) -> None:
    """Two conversations come back at once, the other way round: each takes the slot holding its own prompt, not
    the lowest free one (which holds the other's), and reads only its last token again."""
    prompts = [f"<|im_start|>user\nA question about {topic}, asked at length.<|im_end|>\n" for topic in ("ships", "trains")]
    finals: dict[str, GenerationChunk] = {}

    def one(prompt: str) -> None:  # long enough for both to be generating at once
        finals[prompt] = run(backend, prompt, max_tokens=20, ignore_eos=True)[-1]

    for order in (prompts, prompts[::-1]):
        threads = [threading.Thread(target=one, args=(prompt,)) for prompt in order]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(60)
    for prompt in prompts:
        assert finals[prompt].cached_tokens == finals[prompt].prompt_tokens - 1


def test_batches_list_sequences_in_order(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp decodes consecutive sequences in one pass only when the batch meets them in increasing order: a
    prompt read in sequence 0 beside a stream generating in sequence 1 goes into the batch first."""
    scheduler = backend.scheduler
    assert scheduler is not None
    seen: list[list[int]] = []
    decode = L.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        seen.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(ctx, batch)

    # Two streams fill both slots; the one in sequence 0 stops, and a new prompt is read there beside the other.
    prompts = [f"<|im_start|>user\nCount slowly from one to {n}.<|im_end|>\n" for n in ("forty", "fifty")]
    stops = {prompt: threading.Event() for prompt in prompts}

    def stream(prompt: str) -> None:
        spec = GenerationSpec(prompt=prompt, prompt_tokens=None, parse_special=True, max_tokens=150, ignore_eos=True,
                              sampling=Sampling(temperature=0))
        for _ in backend.generate(spec, cancelled=stops[prompt].is_set):
            pass

    streams = [threading.Thread(target=stream, args=(prompt,)) for prompt in prompts]
    for thread in streams:
        thread.start()
        time.sleep(0.2)
    first = scheduler.slots[0].job
    assert first is not None and scheduler.slots[1].job is not None
    stops[next(p for p in prompts if backend.tokenize(p, True, True) == first.tokens)].set()
    time.sleep(0.2)
    monkeypatch.setattr(L, "llama_decode", recording)
    newcomer = run(backend, "<|im_start|>user\nSomething else entirely, and at some length too.<|im_end|>\n",
                   max_tokens=2)
    for event in stops.values():
        event.set()
    for thread in streams:
        thread.join(60)
    assert newcomer[-1].finish_reason == "length"
    mixed = [seqs for seqs in seen if len(set(seqs)) > 1]
    assert mixed, "the new prompt was never read beside the generating stream"
    assert all(seqs == sorted(seqs) for seqs in mixed), mixed


def test_grammar_and_logprobs_in_the_loop(backend: Backend) -> None:
    spec = GenerationSpec(prompt="Is water wet? Answer:", prompt_tokens=None, max_tokens=8, logprobs=True,
                          top_logprobs=3, sampling=Sampling(temperature=0, grammar='root ::= " " ("yes" | "no") "."'))
    chunks = list(backend.generate(spec, cancelled=lambda: False))
    text = "".join(c.text for c in chunks)
    assert text in (" yes.", " no.") and chunks[-1].finish_reason == "stop"
    entries = [e for c in chunks for e in c.logprobs]
    assert "".join(e.text for e in entries) == text
    assert all(e.logprob <= 0 and len(e.top) == 3 and e.top[0].logprob >= e.top[2].logprob for e in entries)
    with pytest.raises(InvalidRequest) as caught:
        list(backend.generate(GenerationSpec(prompt="x", prompt_tokens=None, max_tokens=2,
                                             sampling=Sampling(grammar="root ::= (")), cancelled=lambda: False))
    assert caught.value.param == "grammar"


def _read_on_a_loop(backend: Backend, spec: GenerationSpec, interval: float, keep: int | None = None,
                    on_chunk: Callable[[GenerationChunk], None] | None = None) -> tuple[list[GenerationChunk], int, int]:
    """Reads `spec` on a fresh event loop with the given stream interval (all of it, or its first `keep` chunks),
    calling `on_chunk` with each chunk on the loop: the chunks, how often the loop was woken from another thread
    while reading, and how often in the few intervals after."""
    scheduler = backend.scheduler
    assert scheduler is not None

    async def read() -> tuple[list[GenerationChunk], int, int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        threadsafe = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return threadsafe(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        chunks: list[GenerationChunk] = []
        async with contextlib.aclosing(backend.agenerate(spec)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)
                if keep is not None and len(chunks) >= keep:
                    break
        reading = wakes
        await asyncio.sleep(min(3 * scheduler.delivery_interval(), 1.0) + 0.1)
        return chunks, reading, wakes - reading

    before = scheduler.stream_interval
    scheduler.stream_interval = interval
    try:
        return asyncio.run(read())
    finally:
        scheduler.stream_interval = before


def test_loop_readers_get_text_once_an_interval(backend: Backend) -> None:
    """For readers on an event loop the decode thread hands text over between two steps: the first text at once,
    the rest once an interval (several tokens a delivery), the end at once, one wake of the loop a delivery, and
    none once the job has ended. The text is the same as read any other way."""
    spec = GenerationSpec(prompt="Once upon a time", prompt_tokens=None, max_tokens=96, ignore_eos=True,
                          sampling=Sampling(temperature=0))
    expected = "".join(c.text for c in backend.generate(spec, cancelled=lambda: False))
    # Well above a decode step, even on a busy machine: deliveries carry several tokens.
    chunks, wakes, wakes_after = _read_on_a_loop(backend, spec, 0.15)
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "length"
    texts = [c for c in chunks if c.text]
    assert 3 <= len(texts) < 48, "96 tokens take several intervals, and a delivery carries several tokens"
    assert wakes <= len(chunks) + 1, f"{wakes} wake-ups for {len(chunks)} deliveries (one more to tokenize)"
    assert wakes_after == 0


def test_loop_takes_text_while_the_decode_thread_waits(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode thread decodes on only once the loop has handed the text to its readers and they have run: the
    loop's work never competes with llama.cpp's threads for the cores."""
    scheduler = backend.scheduler
    assert scheduler is not None
    decodes: list[float] = []
    readers: list[tuple[float, float]] = []
    decode = L.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        decodes.append(time.perf_counter())
        return decode(ctx, batch)

    def slow_reader(chunk: GenerationChunk) -> None:
        start = time.perf_counter()
        time.sleep(0.02)  # the reader holds the loop (and, asleep, leaves the GIL and the cores to the decoder)
        readers.append((start, time.perf_counter()))

    monkeypatch.setattr(L, "llama_decode", recording)
    monkeypatch.setattr(scheduler, "handover_wait", 10.0)
    spec = GenerationSpec(prompt="Once upon a time", prompt_tokens=None, max_tokens=40, ignore_eos=True,
                          sampling=Sampling(temperature=0))
    chunks, _, _ = _read_on_a_loop(backend, spec, 0.03, on_chunk=slow_reader)
    assert chunks[-1].finish_reason == "length" and len(readers) >= 3 and len(decodes) >= 40
    overlapping = [start for start in decodes if any(a < start < b for a, b in readers)]
    assert not overlapping, f"{len(overlapping)} decodes started while a reader ran"


def test_text_waiting_goes_out_before_a_long_step(backend: Backend) -> None:
    """Text held for its interval goes out before a step that admits a request (which may read a long prompt):
    with an interval far longer than the stream, a reader still gets text from the middle of it once another
    request comes."""
    spec = GenerationSpec(prompt="Once upon a time", prompt_tokens=None, max_tokens=200, ignore_eos=True,
                          sampling=Sampling(temperature=0))
    other = threading.Thread(target=run, args=(backend, "A question in the middle of a story."), kwargs={"max_tokens": 2})
    arrivals: list[tuple[float, GenerationChunk]] = []
    asked: list[float] = []

    def ask() -> None:
        asked.append(time.perf_counter())
        other.start()

    def on_chunk(chunk: GenerationChunk) -> None:
        arrivals.append((time.perf_counter(), chunk))
        if len(arrivals) == 1:
            timer.start()

    timer = threading.Timer(0.3, ask)  # well into the stream, after its first text
    chunks, _, _ = _read_on_a_loop(backend, spec, 60.0, on_chunk=on_chunk)
    timer.join(60)
    other.join(60)
    assert chunks[-1].finish_reason == "length" and asked
    end = arrivals[-1][0]  # the last text and the end come together
    middle = [chunk for when, chunk in arrivals if asked[0] < when < end - 0.1 and chunk.text]
    assert middle, "nothing came between the other request and the end"


def test_loop_reader_leaving_frees_its_slot(backend: Backend) -> None:
    spec = GenerationSpec(prompt="Once upon a time", prompt_tokens=None, max_tokens=400, ignore_eos=True,
                          sampling=Sampling(temperature=0))
    chunks, _, wakes_after = _read_on_a_loop(backend, spec, 0.02, keep=2)
    assert len(chunks) == 2 and not chunks[-1].finish_reason
    assert backend.active_requests() == 0 and wakes_after <= 1


def _mapped(path: Path) -> bool:
    """Whether this process maps `path` into its memory."""
    target = str(path.resolve())
    return any(line.rstrip().endswith(target) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize(("setting", "expect_mapped"), [(True, True), (False, False), (None, False)])
def test_mmap_setting_maps_the_weights_or_reads_them_in(backend: Backend, smollm2_file: Path, setting: bool | None,
                                                        expect_mapped: bool) -> None:
    """LocalAI's `mmap`: true maps the GGUF into the runner's memory, false reads the weights in. Unset, a model
    that takes at most half the available memory (as this one does) is read in. Either way it generates the same."""
    assert not _mapped(smollm2_file)
    loaded = Backend()
    try:
        loaded.load(LoadSpec(model_name="smol", backend="llama-cpp", model_path=str(smollm2_file),
                             config={"mmap": setting}, threads=2, context_size=256, parallel=1))
        assert _mapped(smollm2_file) is expect_mapped
        text = "".join(c.text for c in run(loaded, "The capital of France is", max_tokens=6))
    finally:
        loaded.close()
    assert not _mapped(smollm2_file), "closing the model unmaps its file"
    assert text == "".join(c.text for c in run(backend, "The capital of France is", max_tokens=6))


def test_mmap_default_follows_the_memory_available() -> None:
    gib = 2**30
    assert maps_weights(None, 1 * gib, 8 * gib) is False  # small beside the memory available: read in
    assert maps_weights(None, 5 * gib, 8 * gib) is True  # over half of it: mapped, paged in by the kernel
    assert maps_weights(None, 1 * gib, None) is True  # memory unknown: mapped, as llama.cpp would
    assert maps_weights(True, 1 * gib, 8 * gib) is True and maps_weights(False, 5 * gib, 8 * gib) is False


@pytest.mark.parametrize("embeddings", [False, True])
def test_threads_follow_the_board_of_busy_runners(backend: Backend, smollm2_file: Path, tmp_path: Path,
                                                  embeddings: bool) -> None:
    """While the server's board shows another runner working, each step computes with a share of the cores (one
    thread of two on two cores), and with all of them again once it is alone; the results do not change."""
    board = Board(tmp_path / "cores", create=True)
    loaded = Backend()
    try:
        loaded.load(LoadSpec(model_name="smol", backend="llama-cpp", model_path=str(smollm2_file),
                             config={"embeddings": embeddings}, threads=2, context_size=256, parallel=1, board=board))
        share = loaded.pooled.share if embeddings else loaded.scheduler.share
        share.cores = 2  # as on this machine kind, whatever the machine running the tests

        def work() -> Any:
            if embeddings:
                return loaded.embed(["The capital of France is"], False, True)[0][0].tolist()
            return "".join(c.text for c in run(loaded, "The capital of France is", max_tokens=6))

        def threads() -> int:
            return loaded.pooled.threads if embeddings else loaded.scheduler.threads

        ctx = loaded.pooled.ctx if embeddings else loaded.ctx

        alone = work()
        assert threads() == 2
        board.mark(0, True)  # this runner, as the server marks it while its request is in flight
        board.mark(4, True)  # another runner working at the same time
        shared = work()
        assert threads() == 1 and L.llama_n_threads(ctx) == 1
        board.mark(4, False)
        again = work()
        assert threads() == 2 and L.llama_n_threads(ctx) == 2
    finally:
        loaded.close()
        board.close()
    assert shared == alone and again == alone
    if not embeddings:
        assert alone == "".join(c.text for c in run(backend, "The capital of France is", max_tokens=6))


def test_fewer_sequences_where_memory_is_short(smollm2_file: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """context_size is what one request may use: with memory for only two such caches, two sequences are served
    (and the log says so) instead of each getting a quarter."""
    assert sequences_that_fit(4, 100, 250) == 2 and sequences_that_fit(4, 100, 99) == 0
    assert sequences_that_fit(4, 100, None) == 4
    loaded = Backend()
    loaded.load(LoadSpec(model_name="probe", backend="llama-cpp", model_path=str(smollm2_file), config={},
                         threads=2, context_size=1024, parallel=1))
    per_sequence = loaded._kv_bytes(1024)
    loaded.close()
    readings = iter([2**34, int(per_sequence * 2.5)])  # room for the weights, then for two caches of 1024 tokens
    monkeypatch.setattr(llama_backend, "_mem_available", lambda: next(readings))
    short = Backend()
    try:
        with caplog.at_level("WARNING"):
            info = short.load(LoadSpec(model_name="short", backend="llama-cpp", model_path=str(smollm2_file),
                                       config={"mmap": True}, threads=2, context_size=1024, parallel=4))
        assert info.parallel == 2 and info.context_size == 1024
        assert "serving 2 at once instead" in caplog.text
    finally:
        short.close()


def test_quantised_kv_cache_types(smollm2_file: Path) -> None:
    """LocalAI's cache_type_k / cache_type_v: llama.cpp keeps the cache in q8_0, in about half the memory."""
    quantised = Backend()
    try:
        quantised.load(LoadSpec(model_name="q8", backend="llama-cpp", model_path=str(smollm2_file),
                                config={"cache_type_k": "q8_0", "cache_type_v": "q8_0", "flash_attention": True},
                                threads=2, context_size=512, parallel=1))
        plain = Backend()
        plain.load(LoadSpec(model_name="f16", backend="llama-cpp", model_path=str(smollm2_file), config={},
                            threads=2, context_size=512, parallel=1))
        assert quantised._kv_bytes(512) < 0.6 * plain._kv_bytes(512)
        plain.close()
        text = "".join(c.text for c in run(quantised, "The capital of France is", max_tokens=6))
        assert text.strip()
    finally:
        quantised.close()
