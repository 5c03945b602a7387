"""Thinking controls on a real model: Qwen2.5-Coder 0.5B under Qwen3.5's chat template, which opens a thought at
the end of the prompt (so the model thinks whether or not it was trained to). Turning thinking off, a budget of
0 or of N tokens, and a response_format answered after the thoughts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import HearthServer, cached_model, install_cached, write_yaml

pytestmark = pytest.mark.real_model

TEMPLATE = Path(__file__).parent / "data" / "llama-chat" / "templates" / "Qwen3.5-4B.jinja"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                                 "maxLength": 20}},
        "required": ["city", "country"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("reasoning-real")
    install_cached(models, cached_model("qwen2.5-coder-0.5b-instruct"), "qwen.gguf")
    write_yaml(models, "thinker", {"name": "thinker", "parameters": {"model": "qwen.gguf", "temperature": 0},
                                   "context_size": 2048, "template": {"chat": TEMPLATE.read_text()}})
    server = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


def test_thinking_turned_off_gives_an_answer_without_thoughts(server: HearthServer) -> None:
    client = server.client()
    for extra in ({"reasoning_effort": "none"}, {"reasoning_budget": 0}):
        reply = client.chat.completions.create(model="thinker", messages=QUESTION, max_tokens=12, extra_body=extra)
        message = reply.choices[0].message
        assert not (message.model_extra or {}).get("reasoning_content"), extra
        assert "<think>" not in (message.content or "") and "</think>" not in (message.content or "")
        assert (message.content or "").strip(), extra  # (what a 0.5B model says under another's template varies)
        assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_a_budget_ends_the_thought_and_the_answer_follows(server: HearthServer) -> None:
    reply = server.client().chat.completions.create(model="thinker", messages=QUESTION, max_tokens=30,
                                                    extra_body={"reasoning_budget": 12})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"].strip()
    assert 0 < reply.usage.completion_tokens_details.reasoning_tokens <= 12
    assert "</think>" not in (message.content or "") and (message.content or "").strip()


def test_response_format_applies_to_the_answer_after_the_thoughts(server: HearthServer) -> None:
    client = server.client()
    for stream in (False, True):
        kwargs = {"model": "thinker", "max_tokens": 60, "extra_body": {"reasoning_budget": 10},
                  "response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                              "schema": CITY}},
                  "messages": [{"role": "user", "content": "Give the capital of France and its country as JSON."}]}
        if stream:
            content, thought = "", ""
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    content += chunk.choices[0].delta.content or ""
                    thought += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        else:
            message = client.chat.completions.create(**kwargs).choices[0].message
            content, thought = message.content or "", message.model_extra.get("reasoning_content") or ""
        assert thought.strip(), "the model thought first"
        jsonschema.validate(json.loads(content), CITY)
