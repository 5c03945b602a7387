"""Thoughts and tool calls through every API, with the official openai, anthropic and ollama clients.

The fake backend answers with a fixed reply written in a real model family's format, under that family's real chat
template (vendored from llama.cpp): gpt-oss's channels, Qwen3's <think>, DeepSeek-R1's thought opened by the
prompt and its tool tokens, Qwen3-Coder's XML calls. What comes back must sit in the right fields, whole and
streamed, with no marker in the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from conftest import HearthServer, write_yaml

from hearth.chat.request import ChatRequest
from hearth.chat.serving import Plan, template_messages
from hearth.chat.template import render_chat

TEMPLATES = Path(__file__).parent / "data" / "llama-chat" / "templates"
THOUGHT = "The user asks about Paris; the weather tool knows."
ANSWER = "It is sunny in Paris."
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
FAMILIES = {
    "gpt-oss": ("openai-gpt-oss-120b.jinja",
                f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}",
                f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>commentary "
                'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
              f'<think>\n{THOUGHT}\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}'
              "\n</tool_call>"),
    "deepseek-r1": ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", f"{THOUGHT}\n</think>\n\n{ANSWER}",
                    f"{THOUGHT}\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    "qwen3-coder": ("Qwen3-Coder.jinja", f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
                    f"<think>\n{THOUGHT}\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                    "</parameter>\n</function>\n</tool_call>"),
}
MARKERS = ("<think>", "</think>", "<|channel|>", "<|message|>", "<tool_call>", "<function=", "｜", "<|end|>")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("reasoning-models")
    for family, (template, text, call) in FAMILIES.items():
        source = (TEMPLATES / template).read_text()
        write_yaml(models, family, {"name": family, "backend": "fake",
                                    "fake": {"chat_template": source, "reply": text}})
        write_yaml(models, f"{family}-caller", {"name": f"{family}-caller", "backend": "fake",
                                                "fake": {"chat_template": source, "reply": call}})
        write_yaml(models, f"{family}-echo", {"name": f"{family}-echo", "backend": "fake",
                                              "fake": {"chat_template": source, "echo_prompt": True}})
    write_yaml(models, "qwen3-one-field", {"name": "qwen3-one-field", "backend": "fake", "reasoning": {
        "field": "reasoning"}, "fake": {"chat_template": (TEMPLATES / FAMILIES["qwen3"][0]).read_text(),
                                         "reply": FAMILIES["qwen3"][1]}})
    write_yaml(models, "qwen3-no-thoughts", {"name": "qwen3-no-thoughts", "backend": "fake", "reasoning_budget": 0,
                                             "fake": {"chat_template": (TEMPLATES / FAMILIES["qwen3"][0]).read_text(),
                                                      "echo_prompt": True}})
    write_yaml(models, "qwen3-kept", {"name": "qwen3-kept", "backend": "fake", "reasoning": {"format": "none"},
                                      "fake": {"chat_template": (TEMPLATES / FAMILIES["qwen3"][0]).read_text(),
                                               "reply": FAMILIES["qwen3"][1]}})
    server = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


def clean(text: str | None) -> str:
    assert not any(marker in (text or "") for marker in MARKERS), text
    return (text or "").strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_chat_whole_and_streamed(server: HearthServer, family: str) -> None:
    client = server.client()
    reply = client.chat.completions.create(model=family, messages=MESSAGES)
    message = reply.choices[0].message
    assert clean(message.content) == ANSWER
    assert message.model_extra["reasoning_content"].strip() == THOUGHT
    assert message.model_extra["reasoning"].strip() == THOUGHT
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    content, thought = "", ""
    for chunk in client.chat.completions.create(model=family, messages=MESSAGES, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
    assert clean(content) == ANSWER and thought.strip() == THOUGHT


@pytest.mark.parametrize("family", FAMILIES)
def test_openai_tool_calls_after_thoughts(server: HearthServer, family: str) -> None:
    client = server.client()
    reply = client.chat.completions.create(model=f"{family}-caller", messages=MESSAGES, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert clean(choice.message.content) == ""
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.model_extra["reasoning_content"].strip() == THOUGHT
    names, arguments, content = [], "", ""
    for chunk in client.chat.completions.create(model=f"{family}-caller", messages=MESSAGES, tools=[WEATHER],
                                                stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if delta_call.function.name:
                names.append(delta_call.function.name)
            arguments += delta_call.function.arguments or ""
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"} and clean(content) == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_anthropic_thinking_blocks(server: HearthServer, family: str) -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused")
    message = client.messages.create(model=family, max_tokens=200, messages=MESSAGES)
    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text"]
    assert message.content[0].thinking.strip() == THOUGHT and clean(message.content[1].text) == ANSWER
    thought, text = "", ""
    with client.messages.stream(model=family, max_tokens=200, messages=MESSAGES) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                thought += event.delta.thinking
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
    assert thought.strip() == THOUGHT and clean(text) == ANSWER
    called = client.messages.create(model=f"{family}-caller", max_tokens=200, messages=MESSAGES, tools=[{
        "name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}])
    assert [b.type for b in called.content] == ["thinking", "tool_use"] and called.stop_reason == "tool_use"
    assert called.content[1].input == {"city": "Paris"}


@pytest.mark.parametrize("family", FAMILIES)
def test_ollama_thinking_and_tools(server: HearthServer, family: str) -> None:
    client = ollama.Client(host=server.base_url)
    reply = client.chat(model=family, messages=MESSAGES, think=True)
    assert reply.message.thinking.strip() == THOUGHT and clean(reply.message.content) == ANSWER
    thought, text = "", ""
    for part in client.chat(model=family, messages=MESSAGES, think=True, stream=True):
        thought += part.message.thinking or ""
        text += part.message.content or ""
    assert thought.strip() == THOUGHT and clean(text) == ANSWER
    called = client.chat(model=f"{family}-caller", messages=MESSAGES, tools=[WEATHER])
    assert called.message.tool_calls[0].function.name == "get_weather"
    assert dict(called.message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_responses_reasoning_items(server: HearthServer) -> None:
    client = server.client()
    response = client.responses.create(model="qwen3", input="What is the weather in Paris?")
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].content[0].text.strip() == THOUGHT
    assert clean(response.output_text) == ANSWER
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    deltas = [e.delta for e in client.responses.create(model="qwen3", input="Hi", stream=True)
              if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas).strip() == THOUGHT


def test_reasoning_field_setting_and_format_none(server: HearthServer) -> None:
    client = server.client()
    message = client.chat.completions.create(model="qwen3-one-field", messages=MESSAGES).choices[0].message
    assert message.model_extra["reasoning"].strip() == THOUGHT and "reasoning_content" not in message.model_extra
    kept = client.chat.completions.create(model="qwen3-kept", messages=MESSAGES).choices[0].message
    assert kept.content.startswith("<think>") and ANSWER in kept.content
    per_request = client.chat.completions.create(model="qwen3", messages=MESSAGES,
                                                 extra_body={"reasoning_format": "none"}).choices[0].message
    assert per_request.content.startswith("<think>")


def test_thinking_switches_reach_the_template(server: HearthServer) -> None:
    """reasoning_effort none, a budget of 0, Ollama's think false and Anthropic's thinking disabled all render
    Qwen3's template with enable_thinking false (it writes an empty thought); gpt-oss gets its effort."""
    client = server.client()

    def prompt(**extra: object) -> str:
        reply = client.chat.completions.create(model="qwen3-echo", messages=MESSAGES, extra_body=extra)
        return reply.choices[0].message.content or ""

    empty = "<think>\n\n</think>"
    assert empty not in prompt()
    assert empty in prompt(reasoning_effort="none")
    assert empty in prompt(reasoning_budget=0)
    assert empty in prompt(chat_template_kwargs={"enable_thinking": False})
    from_yaml = client.chat.completions.create(model="qwen3-no-thoughts", messages=MESSAGES)
    assert empty in (from_yaml.choices[0].message.content or "")  # the YAML's reasoning_budget: 0
    unlimited = client.chat.completions.create(model="qwen3-no-thoughts", messages=MESSAGES,
                                               extra_body={"reasoning_budget": -1})
    assert empty not in (unlimited.choices[0].message.content or "")  # -1 lifts the YAML's budget
    assert empty in ollama.Client(host=server.base_url).chat(model="qwen3-echo", messages=MESSAGES,
                                                             think=False).message.content
    said = anthropic.Anthropic(base_url=server.base_url, api_key="unused").messages.create(
        model="qwen3-echo", max_tokens=400, messages=MESSAGES, thinking={"type": "disabled"})
    assert empty in "".join(b.text for b in said.content if b.type == "text")
    high = client.chat.completions.create(model="gpt-oss-echo", messages=MESSAGES, reasoning_effort="high")
    assert "Reasoning: high" in (high.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qwen3", messages=MESSAGES, extra_body={
            "chat_template_kwargs": {"custom_flag": True}})
    assert caught.value.body["param"] == "chat_template_kwargs" and "custom_flag" in caught.value.message


def test_prior_thoughts_reach_templates_that_take_them(server: HearthServer) -> None:
    """A client sends an earlier turn's thoughts back as reasoning_content (or reasoning): Qwen3's template writes
    them in the turn after the last question, gpt-oss's (which reads `thinking`) in the analysis channel."""
    history = [*MESSAGES, {"role": "assistant", "content": None, "reasoning_content": "Earlier thought.",
                           "tool_calls": [{"id": "call_1", "type": "function", "function": {
                               "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for field in ("reasoning_content", "reasoning"):
        turn = {k: v for k, v in history[1].items() if k not in ("reasoning_content", "reasoning")}
        sent = [history[0], {**turn, field: "Earlier thought."}, history[2]]
        echoed = server.client().chat.completions.create(model="qwen3-echo", messages=sent)
        assert "<think>\nEarlier thought.\n</think>" in (echoed.choices[0].message.content or "")
    request = ChatRequest(model="m", messages=history, tools=[WEATHER["function"]])
    source = (TEMPLATES / FAMILIES["gpt-oss"][0]).read_text()
    prompt = render_chat(source, template_messages(request, Plan(tools=request.tools, mode="auto"), True),
                         tools=[WEATHER])
    assert "<|channel|>analysis<|message|>Earlier thought." in prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_a_call_cut_off_by_max_tokens_ends_the_stream_cleanly(server: HearthServer, family: str) -> None:
    """Whatever step the reply is cut at, no marker reaches the answer and the stream ends with `length`."""
    client = server.client()
    for max_tokens in range(1, 12):
        content, finish = "", None
        for chunk in client.chat.completions.create(model=f"{family}-caller", messages=MESSAGES, tools=[WEATHER],
                                                    max_tokens=max_tokens, stream=True):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert finish in ("length", "tool_calls"), (max_tokens, finish)
        clean(content)
        whole = client.chat.completions.create(model=f"{family}-caller", messages=MESSAGES, tools=[WEATHER],
                                               max_tokens=max_tokens)
        clean(whole.choices[0].message.content)
