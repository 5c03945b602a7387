"""Anthropic's Messages API and Ollama's, driven with their official Python clients, on SmolLM2 and Qwen 0.5B."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import pytest

from tests.conftest import CACHE_DIR, HearthServer, cached_model, install_cached, write_yaml

pytestmark = pytest.mark.real_model

WEATHER = {"name": "get_current_weather", "description": "Get the current weather in a given location",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                            "required": ["location"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("adapter-models")
    install_cached(models, smollm2_file, "smollm2.gguf")
    install_cached(models, cached_model("qwen2.5-coder-0.5b-instruct"), "qwen.gguf")
    write_yaml(models, "smollm2", {"name": "smollm2", "parameters": {"model": "smollm2.gguf"}, "context_size": 4096})
    write_yaml(models, "qwen", {"name": "qwen", "parameters": {"model": "qwen.gguf"}, "context_size": 8192})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", "--api-key", "sk-test",
                           env={"HEARTH_CACHE_DIR": str(CACHE_DIR)})
    yield started
    started.stop()


@pytest.fixture()
def claude(server: HearthServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="sk-test", max_retries=0)


def test_messages(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model="smollm2", max_tokens=16, system="Answer briefly.",
                                   messages=[{"role": "user", "content": "What is the capital of France?"}],
                                   extra_body={"temperature": 0})
    assert reply.type == "message" and reply.role == "assistant" and reply.model == "smollm2"
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 16
    short = claude.messages.create(model="smollm2", max_tokens=2, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Tell me a long story."}])
    assert short.stop_reason == "max_tokens"


def test_streaming_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="smollm2", max_tokens=24, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Count from one to five."}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text
    assert final.usage.output_tokens > 0


def test_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "What is the weather in Boston?"}]
    reply = claude.messages.create(model="qwen", max_tokens=200, tools=[WEATHER], extra_body={"temperature": 0},
                                   tool_choice={"type": "any"}, messages=messages)
    assert reply.stop_reason == "tool_use"
    call = next(block for block in reply.content if block.type == "tool_use")
    assert call.name == "get_current_weather" and "boston" in call.input["location"].lower()
    messages += [{"role": "assistant", "content": [block.model_dump() for block in reply.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "22 degrees Celsius and sunny"}]}]
    answer = claude.messages.create(model="qwen", max_tokens=60, extra_body={"temperature": 0}, messages=messages)
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": "Hello there"}])
    reply = claude.messages.create(model="smollm2", max_tokens=1, messages=[{"role": "user", "content": "Hello there"}])
    assert counted.input_tokens == reply.usage.input_tokens > 0


def test_anthropic_errors(server: HearthServer, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    missing = httpx.post(f"{server.base_url}/v1/messages", headers={"x-api-key": "sk-test"},
                         json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_ollama_client(server: HearthServer) -> None:
    client = ollama.Client(host=server.base_url, headers={"Authorization": "Bearer sk-test"})
    chat = client.chat(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                       options={"temperature": 0, "num_predict": 8})
    assert chat.message.content and chat.done and chat.eval_count > 0
    streamed = list(client.generate(model="smollm2", prompt="One, two,", stream=True,
                                    options={"temperature": 0, "num_predict": 6}))
    assert streamed[-1].done and "".join(part.response for part in streamed)
    assert "smollm2" in {m.model for m in client.list().models}
    assert client.show("smollm2").modelfile.startswith("FROM")
    assert "smollm2" in {m.model for m in client.ps().models}
    progress = list(client.pull("smollm2-135m-instruct", stream=True))
    assert progress[-1].status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404
