"""Chat parity API semantics (tools, response_format, logprobs, n) on the deterministic fake backend.

What the fake cannot show (grammars actually constraining a model) is tested on real models in
test_chat_parity_llama.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HearthServer, write_yaml

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return calls in <tool_call></tool_call> tags.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CALL_REPLY = ('Let me check.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston, MA", '
              '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": '
              '"America/New_York"}}\n</tool_call>')
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Current weather in a place",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["location"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Boston?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    models: Path = tmp_path_factory.mktemp("parity-models")
    write_yaml(models, "caller", {"name": "caller", "backend": "fake",
                                  "fake": {"chat_template": HERMES_TEMPLATE, "reply": CALL_REPLY}})
    write_yaml(models, "plain", {"name": "plain", "backend": "fake",
                                 "fake": {"chat_template": HERMES_TEMPLATE, "reply": "It is sunny in Boston."}})
    write_yaml(models, "echo-native", {"name": "echo-native", "backend": "fake",
                                       "fake": {"chat_template": HERMES_TEMPLATE, "echo_prompt": True}})
    write_yaml(models, "echo-chatml", {"name": "echo-chatml", "backend": "fake", "fake": {"echo_prompt": True}})
    write_yaml(models, "json-caller", {"name": "json-caller", "backend": "fake", "fake": {
        "reply": '{"name": "get_time", "arguments": {"zone": "UTC"}}'}})
    write_yaml(models, "words", {"name": "words", "backend": "fake"})
    server = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield server
    server.stop()


def test_tool_calls_parsed_from_hermes_output(server: HearthServer) -> None:
    reply = server.client().chat.completions.create(model="caller", messages=MESSAGES, tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_current_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"location": "Boston, MA", "unit": "celsius"}
    assert json.loads(calls[1].function.arguments) == {"zone": "America/New_York"}
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert calls[0].id != calls[1].id


def test_streamed_tool_calls_as_openai_sends_them(server: HearthServer) -> None:
    stream = server.client().chat.completions.create(model="caller", messages=MESSAGES, tools=[WEATHER, TIME],
                                                     stream=True)
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    call_deltas = [call for d in deltas for call in d.tool_calls or []]
    starts = [c for c in call_deltas if c.id]
    assert [(c.index, c.function.name) for c in starts] == [(0, "get_current_weather"), (1, "get_time")]
    pieces = [c for c in call_deltas if not c.id]
    assert all(c.function.name is None and c.type is None for c in pieces)
    assert len([c for c in pieces if c.index == 0]) > 1, "arguments should stream in pieces"
    arguments = "".join(c.function.arguments for c in call_deltas if c.index == 0)
    assert json.loads(arguments) == {"location": "Boston, MA", "unit": "celsius"}
    assert "".join(d.content or "" for d in deltas) == "Let me check.\n"


def test_stream_helper_accumulates_tool_calls(server: HearthServer) -> None:
    with server.client().chat.completions.stream(model="caller", messages=MESSAGES, tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_current_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"zone": "America/New_York"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_parallel_false(server: HearthServer) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="caller", messages=MESSAGES, tools=[WEATHER, TIME],
                                           tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert "<tool_call>" in reply.choices[0].message.content
    reply = client.chat.completions.create(model="caller", messages=MESSAGES, tools=[WEATHER, TIME],
                                           parallel_tool_calls=False)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_current_weather"]


def test_plain_answer_with_tools_offered(server: HearthServer) -> None:
    reply = server.client().chat.completions.create(model="plain", messages=MESSAGES, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is sunny in Boston."
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_call_to_an_unknown_tool_stays_content(server: HearthServer) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="caller", messages=MESSAGES, tools=[TIME])
    message = reply.choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_time"]
    assert message.content.startswith("Let me check.\n<tool_call>\n{\"name\": \"get_current_weather\"")
    with client.chat.completions.stream(model="caller", messages=MESSAGES, tools=[TIME]) as stream:
        streamed = stream.get_final_completion().choices[0].message
    assert streamed.content == message.content
    assert [c.function.arguments for c in streamed.tool_calls] == [c.function.arguments for c in message.tool_calls]


def test_plain_json_calls_for_templates_without_tools(server: HearthServer) -> None:
    reply = server.client().chat.completions.create(model="json-caller", messages=MESSAGES, tools=[TIME])
    calls = reply.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert reply.choices[0].message.content is None


def test_legacy_functions_answer_with_function_call(server: HearthServer) -> None:
    response = server.http().post("/v1/chat/completions", json={
        "model": "json-caller", "messages": MESSAGES, "functions": [TIME["function"]]})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_time"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == {"zone": "UTC"}
    assert "tool_calls" not in choice["message"]


def test_native_template_gets_tools_and_the_conversation(server: HearthServer) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "Boston"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
    ]
    message = server.client().chat.completions.create(model="echo-native", messages=messages, tools=[WEATHER],
                                                      max_tokens=2000).choices[0].message
    prompt = message.content  # the echoed prompt; the earlier call in it reads as a call again
    assert '"name": "get_current_weather"' in prompt and '"description": "Current weather in a place"' in prompt
    assert "<|im_start|>assistant\n" in prompt and "<tool_response>22 C and sunny</tool_response>" in prompt
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_current_weather", {"location": "Boston"})], "the template got the arguments as an object"


def test_other_templates_get_tools_in_the_system_prompt(server: HearthServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {"role": "assistant", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_current_weather", "arguments": '{"location": "Boston"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    prompt = server.client().chat.completions.create(model="echo-chatml", messages=messages, tools=[WEATHER],
                                                     max_tokens=4000).choices[0].message.content
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions:")
    assert '"name": "get_current_weather"' in prompt
    assert '<|im_start|>assistant\n{"name": "get_current_weather", "arguments": {"location": "Boston"}}' in prompt
    assert "<|im_start|>user\nResult of get_current_weather: 22 C<|im_end|>" in prompt


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "pattern"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "function"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}}},
     "response_format.json_schema.schema", "minimum"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ""),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar", "either"),
    ({"tools": [WEATHER], "functions": [TIME["function"]]}, "functions", "either"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "tool_call_id"),
])
def test_bad_tool_and_format_requests_are_400(server: HearthServer, extra: dict, param: str, words: str) -> None:
    body = {"model": "caller", "messages": MESSAGES, **extra}
    response = server.http().post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"]


def test_logprobs_shape_and_stream_consistency(server: HearthServer) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="words", messages=MESSAGES, logprobs=True, top_logprobs=3)
    entries = whole.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode()) for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries)
    stream = client.chat.completions.create(model="words", messages=MESSAGES, logprobs=True, top_logprobs=3,
                                            stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = client.chat.completions.create(model="words", messages=MESSAGES)
    assert plain.choices[0].logprobs is None


def test_completions_legacy_logprobs(server: HearthServer) -> None:
    reply = server.client().completions.create(model="words", prompt="Once", logprobs=2, max_tokens=5)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    response = server.http().post("/v1/completions", json={"model": "words", "prompt": "x", "logprobs": 1,
                                                            "echo": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_n_choices_with_seed(server: HearthServer) -> None:
    client = server.client()
    reply = client.chat.completions.create(model="words", messages=MESSAGES, n=3, temperature=1, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3, "a seed moves on per choice, so choices differ"
    again = client.chat.completions.create(model="words", messages=MESSAGES, n=3, temperature=1, seed=7)
    assert [c.message.content for c in again.choices] == texts
    single = client.chat.completions.create(model="words", messages=MESSAGES, temperature=1, seed=7)
    assert single.choices[0].message.content == texts[0]
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens, "the prompt is counted once"
    assert reply.usage.completion_tokens == 3 * single.usage.completion_tokens
    stream = client.chat.completions.create(model="words", messages=MESSAGES, n=3, temperature=1, seed=7,
                                            stream=True)
    streamed: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_completions_n_and_several_prompts(server: HearthServer) -> None:
    reply = server.client().completions.create(model="words", prompt=["a", "b"], n=2, temperature=1, seed=1,
                                               max_tokens=4)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in reply.choices}
    assert by_index[0] == by_index[2] and by_index[1] == by_index[3] and by_index[0] != by_index[1]


def test_deeply_nested_schema_is_a_400_not_a_crash(server: HearthServer) -> None:
    for depth in (700, 5000):  # past the grammar builder's recursion; past the JSON parser's
        schema = '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth
        body = ('{"model": "caller", "messages": [{"role": "user", "content": "hi"}], "response_format": '
                '{"type": "json_schema", "json_schema": {"name": "deep", "schema": ' + schema + "}}}")
        response = server.http().post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text[:300]
        assert "error" in response.json(), response.text
