"""Continuous batching on a real model: streams progress together, never leak into one another, queue fairly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import HearthServer, install_cached, write_yaml

pytestmark = pytest.mark.real_model

PROMPTS = ["Name a color.", "Name an animal.", "Name a fruit.", "Write the number seven in words."]
SYSTEM = ("You are a careful assistant for a hardware store. You answer questions about tools, paint, garden "
          "supplies and plumbing. Keep answers short, name the aisle where the item is, and never invent prices. "
          "If you do not know, say so and suggest asking a member of staff at the front desk.")


@pytest.fixture(scope="module")
def server(smollm2_file: Path, tmp_path_factory: pytest.TempPathFactory) -> HearthServer:
    models = tmp_path_factory.mktemp("batch-models")
    install_cached(models, smollm2_file, "smollm2.gguf")
    write_yaml(models, "four", {"name": "four", "parameters": {"model": "smollm2.gguf"}, "parallel": 4,
                                "context_size": 1024})
    write_yaml(models, "one", {"name": "one", "parameters": {"model": "smollm2.gguf"}, "parallel": 1,
                               "context_size": 2048, "queue_size": 1})
    for name, interval in (("every-token", 0), ("bursty", 300)):
        write_yaml(models, name, {"name": name, "parameters": {"model": "smollm2.gguf"}, "parallel": 1,
                                  "context_size": 1024, "stream_interval_ms": interval})
    write_yaml(models, "spread", {"name": "spread", "parameters": {"model": "smollm2.gguf"}, "parallel": 4,
                                  "context_size": 1024, "stream_interval_ms": 150})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield started
    started.stop()


def stream_times(client: openai.OpenAI, prompt: str, max_tokens: int, record: dict) -> None:
    first = None
    text = ""
    for chunk in client.chat.completions.create(model="four", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            first = first or time.monotonic()
        if chunk.choices and chunk.choices[0].finish_reason:
            record[prompt] = (first, time.monotonic(), chunk.choices[0].finish_reason, text)


def test_four_streams_progress_together(server: HearthServer) -> None:
    client = server.client()
    client.completions.create(model="four", prompt="warm up", max_tokens=1)
    record: dict[str, tuple] = {}
    threads = [threading.Thread(target=stream_times, args=(client, p, 48, record)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(record) == 4
    firsts = [r[0] for r in record.values()]
    finishes = [r[1] for r in record.values()]
    # Every stream got its first token before any stream finished: they were decoded together, not queued.
    assert max(firsts) < min(finishes)
    assert all(r[2] == "length" for r in record.values())  # none was cut short


def test_batched_greedy_outputs_match_solo_outputs(server: HearthServer) -> None:
    client = server.client()

    def ask(prompt: str) -> str:
        return client.chat.completions.create(model="four", messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=24).choices[0].message.content

    solo = {p: ask(p) for p in PROMPTS}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: together.__setitem__(p, ask(p))) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == solo


def test_greedy_fast_path_picks_what_llamas_sampler_picks(server: HearthServer) -> None:
    """Plain greedy reads the argmax of the logits in place; a zero logit bias puts llama.cpp's own sampler chain
    in its place without changing any logit. Run together (each stream on its own row of logits), the two agree."""
    client = server.client()

    def ask(prompt: str, through_chain: bool) -> str:
        extra = {"logit_bias": {"0": 0}} if through_chain else {}
        return client.chat.completions.create(model="four", messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=32, **extra).choices[0].message.content

    answers: dict[tuple[str, bool], str] = {}
    threads = [threading.Thread(target=lambda p=p, c=c: answers.__setitem__((p, c), ask(p, c)))
               for p in PROMPTS[:2] for c in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 4
    for prompt in PROMPTS[:2]:
        assert answers[(prompt, False)] == answers[(prompt, True)]
        assert answers[(prompt, False)]


def test_queue_is_bounded_with_429_and_retry_after(server: HearthServer) -> None:
    client = server.client()
    body = {"model": "one", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    http = server.http()
    busy = http.stream("POST", "/v1/completions", json=body)
    first = busy.__enter__()
    lines = first.iter_lines()  # keep the iterator: dropping it would close the response
    next(lines)  # the only slot is now generating
    queued_result: list = []
    queued = threading.Thread(target=lambda: queued_result.append(
        client.completions.create(model="one", prompt="Hi", max_tokens=2)))
    queued.start()
    time.sleep(0.5)  # the second request waits in the queue (size 1)
    try:
        response = httpx.post(f"{server.base_url}/v1/completions", json={"model": "one", "prompt": "x",
                                                                          "max_tokens": 2}, timeout=30)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and "busy" in error["message"]
    finally:
        busy.__exit__(None, None, None)  # disconnect: frees the slot for the queued request
    queued.join(60)
    assert queued_result and queued_result[0].choices[0].finish_reason in ("stop", "length")


def test_disconnect_frees_the_slot_at_once(server: HearthServer) -> None:
    client = server.client()
    stream = client.completions.create(model="one", prompt="Once upon a time", max_tokens=1500, stream=True,
                                       extra_body={"ignore_eos": True})
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    started = time.monotonic()
    reply = client.completions.create(model="one", prompt="Hello", max_tokens=4)
    # Served long before 1,500 tokens could have been generated: the cancelled stream gave up its slot.
    assert reply.usage.completion_tokens == 4
    assert time.monotonic() - started < 10
    assert "cancelled by the client" in server.log()


def test_shared_system_prompt_is_reused(server: HearthServer) -> None:
    client = server.client()

    def ask(question: str):
        return client.chat.completions.create(model="one", max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])

    first = ask("Where are the hammers?")
    second = ask("Do you sell tulip bulbs?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 40 and cached < second.usage.prompt_tokens
    assert second.timings["prompt_n"] == second.usage.prompt_tokens - cached  # type: ignore[attr-defined]
    assert first.usage.prompt_tokens > 40


def test_prefix_copied_from_a_busy_sequence(server: HearthServer) -> None:
    client = server.client()
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is there a paint aisle?"}]
    busy = client.chat.completions.create(model="four", stream=True, max_tokens=300, temperature=0,
                                          extra_body={"ignore_eos": True}, messages=[
                                              {"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": "Tell me about every aisle."}])
    for _ in zip(range(3), busy, strict=False):
        pass
    copied = client.chat.completions.create(model="four", messages=question, temperature=0, max_tokens=16)
    busy.close()
    assert copied.usage.prompt_tokens_details.cached_tokens >= 40
    # The copied entries are right: asked again once the donor is gone, the answer is the same.
    assert copied.choices[0].message.content
    again = client.chat.completions.create(model="four", messages=question, temperature=0, max_tokens=16)
    assert again.choices[0].message.content == copied.choices[0].message.content


def test_stream_interval_groups_tokens_but_not_the_first(server: HearthServer) -> None:
    """`stream_interval_ms` holds streamed text back to at most one delivery per interval; the first text and the
    end still go at once, and the text is the same as when every token goes out on its own."""
    client = server.client()

    def stream(model: str) -> tuple[list[str], float, float]:
        sent = time.monotonic()
        pieces, first = [], 0.0
        for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=40, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
                first = first or time.monotonic() - sent
        return pieces, first, time.monotonic() - sent

    stream("bursty")  # loads it
    stream("every-token")
    every, _, _ = stream("every-token")
    grouped, first, total = stream("bursty")
    assert "".join(grouped) == "".join(every)
    assert len(every) >= 20, "with no interval each token goes out on its own (a slow reader may merge a few)"
    # 40 tokens take well under a second or two on SmolLM2: at 300 ms at most a handful of deliveries.
    assert len(grouped) <= 2 + total / 0.3 and len(grouped) < len(every)
    assert first < total / 2, "the first text is not held back"


def test_stream_interval_grows_with_the_streams_generating(server: HearthServer) -> None:
    """With four sequences generating, each stream's text goes out at most every 4 x 150 ms. Counted while all
    four run (after the last first token, before the first end: no stream starts or ends then, so nothing is
    sent early). A slow reader can only merge pieces, never add any, so the count is safe to bound."""
    client = server.client()
    client.completions.create(model="spread", prompt="warm up", max_tokens=1)
    arrivals: dict[int, list[float]] = {}

    def stream(index: int) -> None:
        times = arrivals.setdefault(index, [])
        for chunk in client.completions.create(model="spread", prompt=f"Chapter {index}. Once upon a time",
                                               max_tokens=128, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(arrivals) == 4 and all(arrivals.values())
    start = max(times[0] for times in arrivals.values())
    end = min(times[-1] for times in arrivals.values())
    window = end - start
    assert window > 1.0, "128 tokens on four streams of SmolLM2 take seconds"
    inside = sum(1 for times in arrivals.values() for t in times if start < t < end)
    # At 150 ms each stream would get window / 0.15 pieces; spread over four streams, at most window / 0.6 (+1).
    assert inside <= 4 * (window / 0.6 + 1), (inside, window)
