"""API semantics end to end: the real server process, the official openai client, the deterministic backend."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import HearthServer

MESSAGES = [{"role": "user", "content": "hi"}]


def sse_frames(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# -- models ----------------------------------------------------------------------------------------------


def test_models_list_names_and_aliases(fake_server: HearthServer) -> None:
    ids = [m.id for m in fake_server.client().models.list()]
    assert "fake-model" in ids and "gpt-fake" in ids
    assert "off-model" not in ids  # disabled models are not offered
    same = fake_server.http().get("/models").json()
    assert [m["id"] for m in same["data"]] == ids


def test_model_get_and_unknown(fake_server: HearthServer) -> None:
    model = fake_server.client().models.retrieve("gpt-fake")
    assert model.id == "gpt-fake" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        fake_server.client().models.retrieve("no-such-model")
    assert "no-such-model" in caught.value.message


# -- chat ------------------------------------------------------------------------------------------------


def test_chat_shape_and_usage(fake_server: HearthServer) -> None:
    reply = fake_server.client().chat.completions.create(model="gpt-fake", messages=MESSAGES)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "gpt-fake"  # echoes the name the client sent, alias included
    assert abs(reply.created - time.time()) < 60
    choice = reply.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.message.role == "assistant"
    # The fake model reports the prompt length in tokens (bytes of the ChatML-rendered prompt).
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert choice.message.content == f"Hello! Your prompt was {len(rendered)} tokens long."
    assert reply.usage.prompt_tokens == len(rendered)
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == len(rendered) + 7


def test_chat_content_parts_and_roles(fake_server: HearthServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": "go"},
    ]
    reply = fake_server.client().chat.completions.create(model="fake-model", messages=messages)
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
                "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nResult of the function: 42<|im_end|>\n"
                "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(rendered)


def test_chat_streaming_frames(fake_server: HearthServer) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True}
    with fake_server.http().stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Hello! Your prompt was")
    assert "usage" not in chunks[-1] or chunks[-1]["usage"] is None


def test_chat_streaming_include_usage_with_openai_client(fake_server: HearthServer) -> None:
    stream = fake_server.client().chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_gives_length(fake_server: HearthServer) -> None:
    client = fake_server.client()
    reply = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    assert reply.choices[0].message.content == "Hello! Your "
    newer = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_completion_tokens=3)
    assert newer.usage.completion_tokens == 3


def test_yaml_defaults_and_request_override(fake_server: HearthServer) -> None:
    client = fake_server.client()
    assert client.chat.completions.create(model="yaml-defaults", messages=MESSAGES).usage.completion_tokens == 3
    reply = client.chat.completions.create(model="yaml-defaults", messages=MESSAGES, max_tokens=5)
    assert reply.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_never_in_output(fake_server: HearthServer, stream: bool) -> None:
    client = fake_server.client()
    if stream:
        parts = client.chat.completions.create(model="fake-model", messages=MESSAGES, stop=["prompt"], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    else:
        text = client.chat.completions.create(model="fake-model", messages=MESSAGES, stop="prompt").choices[0] \
            .message.content
    assert text == "Hello! Your "
    # stopwords from the YAML apply too
    assert client.chat.completions.create(model="stopper", messages=MESSAGES).choices[0].message.content == "one two "


def test_seed_makes_sampling_repeatable(fake_server: HearthServer) -> None:
    client = fake_server.client()

    def sample(seed: int) -> str:
        return client.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0.9,
                                              seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_unknown_fields_are_refused_by_name(fake_server: HearthServer) -> None:
    """No parameter is silently dropped: one Hearth does not know is a 400 naming it, as OpenAI answers."""
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hi"})):
        response = fake_server.http().post(path, json={
            "model": "fake-model", **body, "some_future_field": {"x": 1}, "user": "me"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "some_future_field" and "some_future_field" in error["message"]
    response = fake_server.http().post("/v1/chat/completions", json={
        "model": "fake-model", "messages": MESSAGES, "user": "me", "metadata": {"k": "v"}, "store": False,
        "service_tier": "auto", "top_k": 5, "min_p": 0.1, "typical_p": 0.9, "repeat_last_n": 32})
    assert response.status_code == 200, response.text


def test_model_without_template_cannot_chat_but_completes(fake_server: HearthServer) -> None:
    client = fake_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="no-template", messages=MESSAGES)
    assert "no chat template" in caught.value.message
    assert client.completions.create(model="no-template", prompt="hello").choices[0].text


# -- completions -----------------------------------------------------------------------------------------


def test_completions_prompt_list_keeps_order(fake_server: HearthServer) -> None:
    prompts = ["a", "bbbb", "cc"]
    reply = fake_server.client().completions.create(model="fake-model", prompt=prompts, max_tokens=50)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice, prompt in zip(reply.choices, prompts, strict=True):
        assert choice.text == f"Hello! Your prompt was {len(prompt)} tokens long."
    assert reply.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert reply.usage.completion_tokens == 21


def test_completions_default_max_tokens_is_16(fake_server: HearthServer) -> None:
    reply = fake_server.client().completions.create(model="slow-model", prompt="x")
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


def test_completions_token_prompts_and_echo(fake_server: HearthServer) -> None:
    client = fake_server.client()
    tokens = [b + 3 for b in b"hey"]  # the fake vocabulary: byte + 3
    reply = client.completions.create(model="fake-model", prompt=tokens, echo=True, max_tokens=50)
    assert reply.choices[0].text == "heyHello! Your prompt was 3 tokens long."
    batch = client.completions.create(model="fake-model", prompt=[tokens, tokens[:1]], max_tokens=50)
    assert [c.text for c in batch.choices] == ["Hello! Your prompt was 3 tokens long.",
                                               "Hello! Your prompt was 1 tokens long."]


def test_completions_streaming_several_prompts(fake_server: HearthServer) -> None:
    stream = fake_server.client().completions.create(model="fake-model", prompt=["a", "bb"], stream=True,
                                                     max_tokens=50, stream_options={"include_usage": True})
    chunks = list(stream)
    texts: dict[int, str] = {}
    finishes = {}
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello! Your prompt was 1 tokens long.", 1: "Hello! Your prompt was 2 tokens long."}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3


def test_completions_suffix_refused_without_fim(fake_server: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        fake_server.client().completions.create(model="fake-model", prompt="def f(", suffix="return 1")
    assert "suffix" in caught.value.message and caught.value.body["param"] == "suffix"


# -- errors ----------------------------------------------------------------------------------------------


def test_unknown_model_404_lists_installed(fake_server: HearthServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        fake_server.client().chat.completions.create(model="gpt-5", messages=MESSAGES)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-5" in error["message"] and "fake-model" in error["message"]


def test_malformed_json_400(fake_server: HearthServer) -> None:
    response = fake_server.http().post("/v1/chat/completions", content=b'{"model": "fake-model", "messages": [',
                                       headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "JSON" in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "fake-model"}, "messages"),
    ({"model": "fake-model", "messages": []}, "messages"),
    ({"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "fake-model", "messages": MESSAGES, "temperature": 5}, "temperature"),
    ({"model": "fake-model", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES}, "model"),
    ({"model": "fake-model", "messages": MESSAGES, "max_tokens": 10**12}, "max_tokens"),
    ({"model": "fake-model", "messages": MESSAGES, "top_k": 10**11}, "top_k"),
    ({"model": "fake-model", "messages": MESSAGES, "logit_bias": {"99999999999": 1}}, "logit_bias"),
])
def test_validation_errors_are_400_naming_the_field(fake_server: HearthServer, body: dict, param: str) -> None:
    response = fake_server.http().post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unsupported_parameters_refused(fake_server: HearthServer) -> None:
    client = fake_server.client()
    refused = [({"store": True}, "store"), ({"modalities": ["text", "audio"]}, "modalities"),
               ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"), ({"reasoning_effort": "extreme"}, "reasoning_effort"),
               ({"web_search_options": {}}, "web_search_options"), ({"top_logprobs": 2}, "top_logprobs")]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="fake-model", messages=MESSAGES, **extra)
        assert caught.value.body["param"] == param, extra
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-model", messages=MESSAGES, stop=["a", "b", "c", "d", "e"])
    assert caught.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-model", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}])
    assert "does not accept images" in caught.value.message


def test_context_length_400_names_both_numbers(fake_server: HearthServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        fake_server.client().chat.completions.create(model="small-context", messages=[
            {"role": "user", "content": "x" * 100}])
    message = caught.value.message
    assert caught.value.body["code"] == "context_length_exceeded"
    prompt_tokens = len("<|im_start|>user\n" + "x" * 100 + "<|im_end|>\n<|im_start|>assistant\n")
    assert "64 tokens" in message and f"{prompt_tokens} tokens" in message


def test_disabled_model_403(fake_server: HearthServer) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        fake_server.client().chat.completions.create(model="off-model", messages=MESSAGES)
    assert "disabled" in caught.value.message


def test_load_failure_says_why_and_server_stays_healthy(fake_server: HearthServer) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        fake_server.client().chat.completions.create(model="broken-load", messages=MESSAGES)
    assert "weights are corrupt" in caught.value.message
    assert caught.value.body["code"] == "model_load_failed"
    assert fake_server.http().get("/healthz").status_code == 200
    assert fake_server.client().chat.completions.create(model="fake-model", messages=MESSAGES).choices
    assert "broken-load" not in [r["name"] for r in fake_server.runners()]


def test_body_limit_413(fake_server: HearthServer) -> None:
    big = "x" * (26 * 1024 * 1024)
    response = fake_server.http().post("/v1/chat/completions", json={
        "model": "fake-model", "messages": [{"role": "user", "content": big}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_body_limit_without_content_length(fake_server: HearthServer) -> None:
    def chunks():
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(27):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    response = fake_server.http().post("/v1/chat/completions", content=chunks(),
                                       headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_unknown_route_and_method(fake_server: HearthServer) -> None:
    http = fake_server.http()
    assert http.get("/v1/nope").json()["error"]["message"] == "no route for GET /v1/nope"
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_health_ready_version(fake_server: HearthServer) -> None:
    http = fake_server.http()
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["status"] == "ready"
    assert http.get("/version").json()["name"] == "hearth"


# -- runners ---------------------------------------------------------------------------------------------


def test_concurrent_requests_do_not_corrupt_each_other(fake_server: HearthServer) -> None:
    client = fake_server.client()
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        prompt = "y" * (i + 1)
        results[i] = client.completions.create(model="fake-model", prompt=prompt, max_tokens=50).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: f"Hello! Your prompt was {i + 1} tokens long." for i in range(8)}


def test_client_disconnect_stops_generation(fake_server: HearthServer) -> None:
    body = {"model": "slow-model", "messages": MESSAGES, "stream": True, "max_tokens": 150}
    with fake_server.http().stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"word' in line:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "cancelled by the client" not in fake_server.log():
        time.sleep(0.1)
    assert "cancelled by the client" in fake_server.log()
    runner = next(r for r in fake_server.runners() if r["name"] == "slow-model")
    assert runner["active_requests"] == 0


def test_out_of_range_prompt_tokens_are_400(fake_server: HearthServer) -> None:
    response = fake_server.http().post("/v1/completions", json={"model": "fake-model", "prompt": [99999999999]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_stored_responses_are_capped_oldest_first(fake_models_dir: Path, start_server) -> None:
    """Stored responses keep their whole conversation: beyond the count (or bytes) allowed, the oldest go first."""
    server = start_server(fake_models_dir, env={"HEARTH_RESPONSES_MAX_STORED": "2"})
    client = server.client()
    ids = [client.responses.create(model="fake-model", input=f"turn {i}").id for i in range(3)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
    follow = client.responses.create(model="fake-model", input="and on", previous_response_id=ids[2])
    assert follow.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[1])  # the newest two are ids[2] and the one that continued it
    tight = start_server(fake_models_dir, env={"HEARTH_RESPONSES_MAX_BYTES": "1500"})
    small = tight.client()
    first = small.responses.create(model="fake-model", input="short").id
    second = small.responses.create(model="fake-model", input="y" * 300).id
    with pytest.raises(openai.NotFoundError):
        small.responses.retrieve(first)  # the two together are over the budget: the older goes
    huge = small.responses.create(model="fake-model", input="x" * 1600).id  # over the whole budget: not kept
    with pytest.raises(openai.NotFoundError):
        small.responses.retrieve(huge)
    assert small.responses.retrieve(second).id == second  # and it pushed nothing out
