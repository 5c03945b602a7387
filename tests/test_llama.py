"""The llama.cpp backend end to end on a real model (SmolLM2-135M-Instruct), through the official client."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from pathlib import Path

import openai
import pytest
from llama_cpp import Llama

from hearth.chat.template import render_chat
from tests.conftest import HearthServer, install_cached, write_yaml

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_with_architecture(path: Path, architecture: str) -> None:
    """A minimal valid GGUF v3 header naming an architecture llama.cpp does not know."""
    key, value = b"general.architecture", architecture.encode()
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IQ", 8, len(value)) + value)


@pytest.fixture(scope="module")
def smol_dir(smollm2_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("smol-models")
    install_cached(models, smollm2_file, "smollm2.gguf")
    write_yaml(models, "smollm2", {"name": "smollm2", "backend": "llama-cpp", "parameters": {"model": "smollm2.gguf"},
                                   "context_size": 2048, "alias": ["gpt-4"]})
    write_yaml(models, "tiny-context", {"name": "tiny-context", "parameters": {"model": "smollm2.gguf"},
                                        "context_size": 256, "parallel": 1})
    write_yaml(models, "own-template", {
        "name": "own-template", "parameters": {"model": "smollm2.gguf", "temperature": 0}, "context_size": 256,
        "template": {"chat": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                             "{% endfor %}{{ '<|im_start|>assistant\n' }}"}})
    write_yaml(models, "mapped", {"name": "mapped", "parameters": {"model": "smollm2.gguf"}, "context_size": 256,
                                  "parallel": 1, "mmap": True})
    write_yaml(models, "missing", {"name": "missing-file", "parameters": {"model": "nowhere.gguf"}})
    (models / "not-gguf.bin").write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    write_yaml(models, "notgguf", {"name": "not-a-gguf", "backend": "llama-cpp", "parameters": {"model": "not-gguf.bin"}})
    _gguf_with_architecture(models / "alien.gguf.bin", "alien-arch")
    write_yaml(models, "alien", {"name": "alien", "backend": "llama-cpp", "parameters": {"model": "alien.gguf.bin"}})
    with (models / "huge.gguf.bin").open("wb") as handle:  # sparse: 1 TiB on paper, nothing on disk
        handle.write(b"GGUF")
        handle.truncate(2**40)
    write_yaml(models, "huge", {"name": "huge", "backend": "llama-cpp", "parameters": {"model": "huge.gguf.bin"}})
    return models


@pytest.fixture(scope="module")
def smol(smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> HearthServer:
    server = HearthServer(smol_dir, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vocab(smollm2_file: Path) -> Llama:
    return Llama(str(smollm2_file), vocab_only=True, verbose=False)


def count_tokens(vocab: Llama, text: str) -> int:
    return len(vocab.tokenize(text.encode(), add_bos=True, special=True))


def test_chat_uses_the_gguf_template_and_counts_real_tokens(smol: HearthServer, vocab: Llama) -> None:
    reply = smol.client().chat.completions.create(model="gpt-4", messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.model == "gpt-4" and reply.choices[0].message.content.strip()
    # The GGUF's own template adds SmolLM2's default system prompt; the count proves it was used.
    template = vocab.metadata["tokenizer.chat_template"]
    rendered = render_chat(template, QUESTION)
    assert "You are a helpful AI assistant named SmolLM" in rendered
    assert reply.usage.prompt_tokens == count_tokens(vocab, rendered)
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.timings["predicted_n"] == reply.usage.completion_tokens  # type: ignore[attr-defined]


def test_stream_matches_non_stream_greedy(smol: HearthServer) -> None:
    client = smol.client()
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=30)
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_yaml_template_override(smol: HearthServer, vocab: Llama) -> None:
    reply = smol.client().chat.completions.create(model="own-template", messages=QUESTION, max_tokens=8)
    rendered = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert reply.usage.prompt_tokens == count_tokens(vocab, rendered)


def test_completions_echo_length_and_stop(smol: HearthServer, vocab: Llama) -> None:
    client = smol.client()
    prompt = "The days of the week are Monday, Tuesday,"
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert reply.choices[0].text.startswith(prompt) and len(reply.choices[0].text) > len(prompt)
    assert reply.usage.prompt_tokens == count_tokens(vocab, prompt)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert reply.choices[0].text == prompt + plain
    cut = plain.strip().split()[1]  # a word the greedy answer certainly contains
    stopped = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].text
    assert plain.startswith(stopped.choices[0].text)


def test_completions_several_prompts_and_tokens(smol: HearthServer, vocab: Llama) -> None:
    client = smol.client()
    prompts = ["One, two, three,", "Roses are red,"]
    batch = client.completions.create(model="smollm2", prompt=prompts, max_tokens=6, temperature=0)
    singles = [client.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0).choices[0].text
               for p in prompts]
    assert [c.text for c in batch.choices] == singles
    tokens = vocab.tokenize(prompts[0].encode(), add_bos=False, special=False)
    by_tokens = client.completions.create(model="smollm2", prompt=tokens, max_tokens=6, temperature=0)
    assert by_tokens.choices[0].text == singles[0]


def test_seed_repeats_sampled_output(smol: HearthServer) -> None:
    client = smol.client()

    def sample(seed: int) -> str:
        return client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=1.0, seed=seed,
                                              max_tokens=24).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1


def test_concurrent_requests_each_get_their_own_answer(smol: HearthServer) -> None:
    client = smol.client()
    prompts = ["Name a color.", "Name an animal.", "Name a fruit."]
    solo = {p: client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}],
                                              temperature=0, max_tokens=12).choices[0].message.content
            for p in prompts}
    together: dict[str, str] = {}

    def ask(prompt: str) -> None:
        together[prompt] = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == solo


def test_prompt_longer_than_context(smol: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().chat.completions.create(model="tiny-context", messages=[
            {"role": "user", "content": "word " * 400}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "256 tokens" in caught.value.message and "the prompt is 4" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().completions.create(model="tiny-context", prompt="hello", max_tokens=500)
    assert "lower max_tokens" in caught.value.message


def test_weights_read_into_memory_unless_mmap_is_set(smol: HearthServer, smol_dir: Path) -> None:
    """A small model's weights are read into its runner's memory (they decode faster so); `mmap: true` maps the
    file instead. Both answer alike."""
    client = smol.client()
    answers = {name: client.chat.completions.create(model=name, messages=QUESTION, max_tokens=8, temperature=0)
               .choices[0].message.content for name in ("tiny-context", "mapped")}
    assert answers["tiny-context"] == answers["mapped"]
    model_file = str((smol_dir / "smollm2.gguf").resolve())

    def maps_file(name: str) -> bool:
        maps = Path(f"/proc/{smol.runner_pid(name)}/maps").read_text().splitlines()
        return any(line.rstrip().endswith(model_file) for line in maps)

    assert not maps_file("tiny-context") and maps_file("mapped")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="the kernel gives no transparent huge pages here")
def test_weights_read_in_sit_in_huge_pages(smol: HearthServer, smol_dir: Path) -> None:
    """The runner starts with glibc's malloc asking for transparent huge pages, so weights read into its memory sit
    in 2 MiB pages (they decode faster so: benchmarks/README.md)."""
    smol.client().completions.create(model="tiny-context", prompt="hi", max_tokens=1)
    rollup = Path(f"/proc/{smol.runner_pid('tiny-context')}/smaps_rollup").read_text()
    huge_kib = int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("AnonHugePages:")))
    assert huge_kib * 1024 >= (smol_dir / "smollm2.gguf").stat().st_size // 2, rollup


def test_suffix_refused_without_fim_tokens(smol: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().completions.create(model="smollm2", prompt="def add(a, b):", suffix="\n\nprint(add(1, 2))")
    assert "fill-in-the-middle" in caught.value.message


@pytest.mark.parametrize(("model", "reason"), [
    ("missing-file", "does not exist"),
    ("not-a-gguf", "is not a GGUF file"),
    ("alien", "unknown model architecture: 'alien-arch'"),
    ("huge", "not enough memory"),
])
def test_load_failures_say_why(smol: HearthServer, model: str, reason: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        smol.client().chat.completions.create(model=model, messages=QUESTION)
    assert reason in caught.value.message
    assert smol.http().get("/healthz").status_code == 200
    assert smol.client().completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices


def test_killed_runner_mid_generation(smol: HearthServer) -> None:
    client = smol.client()
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
    pid = smol.runner_pid("smollm2")
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=1500,
                                       stream=True, extra_body={"ignore_eos": True}, temperature=1.0)
    received = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received += chunk.choices[0].text if chunk.choices else ""
            if len(received) > 20 and pid:
                os.kill(pid, signal.SIGKILL)
                pid = 0
    assert "stopped (killed by signal SIGKILL)" in str(caught.value)
    time.sleep(0.2)
    again = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    assert again.choices[0].text is not None and smol.runner_pid("smollm2") != pid


def test_a_chat_that_goes_on_reuses_its_prefix(smol: HearthServer) -> None:
    client = smol.client()
    messages = [{"role": "user", "content": "Tell me one fact about the moon."}]
    first = client.chat.completions.create(model="own-template", messages=messages, max_tokens=16)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And one about the sun?"}]
    second = client.chat.completions.create(model="own-template", messages=messages, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.timings["prompt_n"] == second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens  # type: ignore[attr-defined]


def test_models_working_at_once_share_the_cores(smol_dir: Path, start_server) -> None:
    """Two models decoding at the same time each compute with a share of the cores instead of all of them (their
    threads would otherwise keep preempting one another mid-step), and with all of them again once alone."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(sorted(mine)[:2]))  # the server and its runners see two cores, as on this machine kind
    try:
        server = start_server(smol_dir, "--log-level", "debug")
    finally:
        os.sched_setaffinity(0, mine)
    client = server.client()
    for name in ("tiny-context", "mapped"):  # both loaded before the test proper
        client.completions.create(model=name, prompt="Hi", max_tokens=1)
    assert "threads (busy runners" not in server.log()  # one at a time: every thread, nothing to log
    left = client.completions.create(model="tiny-context", prompt="Once upon a time", max_tokens=200,
                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces = [next(iter(left)).choices[0].text]
    right = client.completions.create(model="mapped", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert right.choices[0].finish_reason == "length"
    pieces += [chunk.choices[0].text for chunk in left if chunk.choices]
    assert len("".join(pieces)) > 200

    def said(model: str, text: str) -> bool:
        return any(f"[{model}]" in line and text in line for line in server.log().splitlines())

    # The model asked second starts while the first is working: from its first step it takes half the cores. (The
    # first takes its half from its next step, unless its current step outlasts the second's short request.)
    assert said("mapped", "computing with 1 of 2 threads (busy runners: 2)")
    deadline = time.monotonic() + 30
    while not said("mapped", "computing with 2 of 2 threads (busy runners: 1)"):
        assert time.monotonic() < deadline, "the model working alone again did not take back its threads"
        again = client.completions.create(model="mapped", prompt="The capital of France is", max_tokens=8,
                                          temperature=0)
        assert again.choices[0].text == right.choices[0].text
