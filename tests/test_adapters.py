"""Ollama's, Anthropic's and OpenAI's Responses APIs, driven with their official Python clients, on SmolLM2 and
Qwen 0.5B."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from hearth.gallery.builtin import install
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
    write_yaml(models, "smollm2", {"name": "smollm2", "parameters": {"model": "smollm2.gguf"}, "context_size": 1024})
    write_yaml(models, "qwen", {"name": "qwen", "parameters": {"model": "qwen.gguf"}, "context_size": 2048})
    install("all-minilm-l6-v2", models, CACHE_DIR)
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


def test_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model="smollm2", max_tokens=40, stop_sequences=[",", "."],
                                   extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Count from one to five, in words."}])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence in (",", ".")
    assert reply.stop_sequence not in reply.content[0].text


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
    assert counted.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert reply.usage.input_tokens > 0


def test_prompt_cache_reads_are_reported(claude: anthropic.Anthropic) -> None:
    """Hearth caches every prompt on its own; as llama-server does, the tokens the cache held are reported as
    `cache_read_input_tokens` and `input_tokens` counts only those computed. `cache_control` marks are accepted."""
    system = [{"type": "text", "text": "You are a careful assistant who answers in one short sentence. " * 8,
               "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a colour of the sky.",
                                              "cache_control": {"type": "ephemeral"}}]}]
    first = claude.messages.create(model="smollm2", max_tokens=4, system=system, messages=messages,
                                   extra_body={"temperature": 0})
    second = claude.messages.create(model="smollm2", max_tokens=4, system=system, messages=messages,
                                    extra_body={"temperature": 0})
    prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == prompt > 80
    assert second.usage.cache_read_input_tokens >= prompt - 1 and second.usage.input_tokens >= 1
    assert second.usage.cache_creation_input_tokens == 0
    with claude.messages.stream(model="smollm2", max_tokens=4, system=system, messages=messages,
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == second.usage.cache_read_input_tokens
    assert final.usage.input_tokens == second.usage.input_tokens


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
    vectors = client.embed(model="all-minilm-l6-v2", input=["a cat", "a dog"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert client.show("smollm2").modelfile.startswith("FROM")
    assert "smollm2" in {m.model for m in client.ps().models}
    progress = list(client.pull("smollm2-135m-instruct", stream=True))
    assert progress[-1].status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404


def test_responses_create_and_continue(server: HearthServer) -> None:
    client = server.client(api_key="sk-test")
    first = client.responses.create(model="smollm2", input="My name is Ada. Say hello to me.",
                                    instructions="Answer briefly.", max_output_tokens=24, temperature=0)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    assert first.output_text and first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    follow = client.responses.create(model="smollm2", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=16, temperature=0)
    assert follow.usage.input_tokens > first.usage.input_tokens, "the earlier turn is part of the prompt"
    assert client.responses.retrieve(first.id).id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="smollm2", input="x", previous_response_id=first.id)


def test_responses_streaming_and_formats(server: HearthServer) -> None:
    client = server.client(api_key="sk-test")
    events = list(client.responses.create(model="smollm2", input="Count to three.", max_output_tokens=12,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    structured = client.responses.create(model="smollm2", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Which city is the capital of France? Answer in JSON."}]}],
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}, temperature=0)
    assert isinstance(json.loads(structured.output_text)["city"], str)


def test_responses_function_call_round_trip(server: HearthServer) -> None:
    client = server.client(api_key="sk-test")
    tool = {"type": "function", "name": "get_current_weather", "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}
    first = client.responses.create(model="qwen", input="What is the weather in Boston?", tools=[tool],
                                    tool_choice="required", temperature=0)
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_current_weather" and "boston" in json.loads(call.arguments)["location"].lower()
    follow = client.responses.create(model="qwen", previous_response_id=first.id, temperature=0,
                                     max_output_tokens=40, tool_choice="none", tools=[tool],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "22 degrees Celsius and sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output


def test_responses_errors(server: HearthServer) -> None:
    client = server.client(api_key="sk-test")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="smollm2", input="x", tools=[{"type": "web_search"}])
    assert caught.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
