"""Ollama's API over the same models: fake models for the semantics, SmolLM2 and MiniLM for real answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth.gallery.builtin import install
from tests.conftest import CACHE_DIR, HearthServer, install_cached, read_metrics, write_yaml

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("ollama-models")
    write_yaml(models, "fake", {"name": "fake", "backend": "fake", "fake": {"reply": "one two three four"}})
    install_cached(models, smollm2_file, "smollm2.gguf")
    write_yaml(models, "smollm2", {"name": "smollm2", "parameters": {"model": "smollm2.gguf"}, "context_size": 1024})
    install("all-minilm-l6-v2", models, CACHE_DIR)
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log",
                           env={"HEARTH_CACHE_DIR": str(CACHE_DIR)})
    yield started
    started.stop()


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def test_version_tags_and_show(server: HearthServer) -> None:
    http = server.http()
    assert http.get("/api/version").json()["version"]
    assert all(http.head(path).status_code == 200 for path in ("/", "/api/version", "/api/tags", "/api/ps"))
    names = {m["name"] for m in http.get("/api/tags").json()["models"]}
    assert {"fake", "smollm2", "all-minilm-l6-v2", "text-embedding-ada-002"} <= names
    # As Ollama's own docs call it: `curl .../api/show -d '{...}'` sends curl's form Content-Type.
    form = http.post("/api/show", content=b'{"model": "smollm2"}',
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.json()["capabilities"] == ["completion"]
    shown = http.post("/api/show", json={"model": "smollm2:latest"})
    assert shown.status_code == 200 and "FROM smollm2.gguf" in shown.json()["modelfile"]
    assert shown.json()["capabilities"] == ["completion"]
    assert http.post("/api/show", json={"model": "all-minilm-l6-v2"}).json()["capabilities"] == ["embedding", "rerank"]
    missing = http.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_chat_streams_ndjson(server: HearthServer) -> None:
    with server.http().stream("POST", "/api/chat", json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        items = lines(response)
    assert all(not i["done"] for i in items[:-1]) and items[-1]["done"] is True
    assert "".join(i["message"]["content"] for i in items) == "one two three four"
    final = items[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 4 and final["prompt_eval_count"] > 0
    assert final["total_duration"] > 0 and "eval_duration" in final


def test_chat_and_generate_without_streaming(server: HearthServer) -> None:
    http = server.http()
    reply = http.post("/api/chat", json={"model": "fake", "stream": False, "options": {"num_predict": 2},
                                         "messages": [{"role": "user", "content": "hi"}]}).json()
    assert reply["message"] == {"role": "assistant", "content": "one two "} and reply["done_reason"] == "length"
    generated = http.post("/api/generate", json={"model": "fake", "prompt": "hi", "system": "Be brief.",
                                                 "stream": False}).json()
    assert generated["response"] == "one two three four" and generated["done"] is True
    raw = http.post("/api/generate", json={"model": "fake", "prompt": "hi", "raw": True, "stream": False}).json()
    assert raw["response"] == "one two three four"
    with_image = http.post("/api/generate", json={"model": "fake", "prompt": "hi", "raw": True, "images": ["AAAA"]})
    assert with_image.status_code == 400 and "images cannot be sent with raw" in with_image.json()["error"]
    # Fields Ollama has and Hearth cannot honour are refused, not dropped.
    for field, value in (("template", "{{ .Prompt }}"), ("context", [1, 2, 3])):
        refused = http.post("/api/generate", json={"model": "fake", "prompt": "hi", field: value})
        assert refused.status_code == 400 and refused.json()["error"].startswith(f"{field} is not supported")
    assert http.post("/api/generate", json={"model": "fake", "prompt": "hi", "stream": False,
                                            "context": []}).status_code == 200  # empty: nothing to drop


def test_real_model_with_json_format(server: HearthServer) -> None:
    reply = server.http().post("/api/chat", json={
        "model": "smollm2", "stream": False, "format": "json", "options": {"temperature": 0, "num_predict": 200},
        "messages": [{"role": "user", "content": "Reply with a JSON object with two keys: city and country, "
                                                 "for Paris."}]}).json()
    assert isinstance(json.loads(reply["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    reply = server.http().post("/api/generate", json={
        "model": "smollm2", "stream": False, "format": schema, "prompt": "What is 2 + 2?",
        "options": {"temperature": 0}}).json()
    assert isinstance(json.loads(reply["response"])["answer"], int)
    # raw: no template, and the format is still kept (the prompt is a completion's).
    reply = server.http().post("/api/generate", json={
        "model": "smollm2", "stream": False, "format": schema, "raw": True, "options": {"temperature": 0},
        "prompt": "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"}).json()
    assert isinstance(json.loads(reply["response"])["answer"], int)
    refused = server.http().post("/api/generate", json={"model": "smollm2", "raw": True, "prompt": "x",
                                                        "format": {"type": "object", "patternProperties": {}}})
    assert refused.status_code == 400 and "patternProperties" in refused.json()["error"]


def test_prompt_cache_hits_are_counted(server: HearthServer) -> None:
    """As Ollama reports them: prompt_eval_count is the whole prompt, prompt_eval_cached_count the part of it the
    model's cache held."""
    http = server.http()
    messages = [{"role": "system", "content": "You answer in one word. " * 10}, {"role": "user", "content": "Sky?"}]

    def chat(**extra: object) -> dict:
        return http.post("/api/chat", json={"model": "smollm2", "stream": False, "messages": messages,
                                            "options": {"temperature": 0, "num_predict": 2}, **extra}).json()

    http.post("/api/chat", json={"model": "smollm2", "stream": False, "options": {"num_predict": 1},
                                 "messages": [{"role": "user", "content": "Something else entirely."}]})
    first, again = chat(), chat()
    assert first["prompt_eval_count"] == again["prompt_eval_count"] > 60
    assert first["prompt_eval_cached_count"] < 10  # only the chat template's opening was held
    assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1
    with http.stream("POST", "/api/generate", json={"model": "smollm2", "system": messages[0]["content"],
                                                    "prompt": "Sky?", "options": {"temperature": 0,
                                                                                   "num_predict": 2}}) as response:
        final = lines(response)[-1]
    assert final["prompt_eval_cached_count"] == final["prompt_eval_count"] - 1
    # The server's metrics counted them too.
    samples = read_metrics(server)
    model = (("model", "smollm2"),)
    assert samples[("hearth_prompt_cached_tokens_total", model)] >= sum(
        r["prompt_eval_cached_count"] for r in (first, again, final))
    assert samples[("hearth_prompt_tokens_total", model)] >= sum(r["prompt_eval_count"] for r in (first, again, final))
    assert samples[("hearth_prompt_seconds_total", model)] > 0 and samples[("hearth_generation_seconds_total", model)] > 0


def test_embeddings(server: HearthServer) -> None:
    http = server.http()
    reply = http.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": ["a cat", "a dog"]}).json()
    assert len(reply["embeddings"]) == 2 and len(reply["embeddings"][0]) == 384 and reply["prompt_eval_count"] > 0
    single = http.post("/api/embeddings", json={"model": "all-minilm-l6-v2", "prompt": "a cat"}).json()
    assert single["embedding"] == pytest.approx(reply["embeddings"][0], abs=1e-6)


def test_errors_in_ollamas_shape(server: HearthServer) -> None:
    http = server.http()
    unknown = http.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"} and "nope" in unknown.json()["error"]
    option = http.post("/api/chat", json={"model": "fake", "options": {"mirostat": 2},
                                          "messages": [{"role": "user", "content": "x"}]})
    assert option.status_code == 400 and "mirostat" in option.json()["error"]
    invalid = http.post("/api/generate", json={"prompt": "x"})
    assert invalid.status_code == 400 and "error" in invalid.json()


def test_keep_alive_zero_unloads(server: HearthServer) -> None:
    http = server.http()
    http.post("/api/generate", json={"model": "fake", "prompt": "hi", "stream": False})
    assert "fake" in {m["name"] for m in http.get("/api/ps").json()["models"]}
    reply = http.post("/api/generate", json={"model": "fake", "keep_alive": 0}).json()
    assert reply["done_reason"] == "unload"
    assert "fake" not in {m["name"] for m in http.get("/api/ps").json()["models"]}
    http.post("/api/generate", json={"model": "fake", "prompt": "hi", "stream": False, "keep_alive": "1s"})
    deadline = time.monotonic() + 10
    while "fake" in {m["name"] for m in http.get("/api/ps").json()["models"]}:
        assert time.monotonic() < deadline, "keep_alive 1s should unload the model"
        time.sleep(0.3)


def test_pull_and_delete(server: HearthServer) -> None:
    http = server.http()
    with http.stream("POST", "/api/pull", json={"model": "smollm2-135m-instruct"}) as response:
        items = lines(response)
    assert items[0]["status"] == "pulling manifest" and items[-1]["status"] == "success"
    assert (server.models_dir / "smollm2-135m-instruct.yaml").exists()
    assert http.post("/api/pull", json={"model": "no-such-model", "stream": False}).status_code == 404
    assert http.request("DELETE", "/api/delete", json={"model": "smollm2-135m-instruct"}).status_code == 200
    assert not (server.models_dir / "smollm2-135m-instruct.yaml").exists()
    assert http.request("DELETE", "/api/delete", json={"model": "smollm2-135m-instruct"}).status_code == 404


def test_tools_and_images(tmp_path: Path) -> None:
    """Ollama's `tools` reach the same tool-call parser, and `images` (base64) the same vision path."""
    import base64

    from tests.test_chat_parity import CALL_REPLY, HERMES_TEMPLATE, TIME, WEATHER
    from tests.test_vision import IMAGE_TOKENS, build_tiny_llava, png

    write_yaml(tmp_path, "caller", {"name": "caller", "backend": "fake",
                                    "fake": {"chat_template": HERMES_TEMPLATE, "reply": CALL_REPLY}})
    write_yaml(tmp_path, "cut-off", {"name": "cut-off", "backend": "fake", "fake": {
        "chat_template": HERMES_TEMPLATE, "reply": '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Eur'}})
    build_tiny_llava(tmp_path / "tiny-llava")
    write_yaml(tmp_path, "tiny-llava", {"name": "tiny-llava", "backend": "transformers",
                                        "parameters": {"model": "tiny-llava"}})
    server = HearthServer(tmp_path, tmp_path / "log.txt")
    try:
        http = server.http()
        reply = http.post("/api/chat", json={"model": "caller", "stream": False, "tools": [WEATHER, TIME],
                                             "messages": [{"role": "user", "content": "Weather in Boston?"}]}).json()
        calls = reply["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_current_weather", "get_time"]
        assert calls[0]["function"]["arguments"] == {"location": "Boston, MA", "unit": "celsius"}
        # A call cut off mid-arguments still answers, with the arguments it could not read as an empty object.
        cut = http.post("/api/chat", json={"model": "cut-off", "stream": False, "tools": [WEATHER, TIME],
                                           "messages": [{"role": "user", "content": "Time?"}]})
        assert cut.status_code == 200
        assert cut.json()["message"]["tool_calls"] == [{"function": {"name": "get_time", "arguments": {}}}]
        image = base64.b64encode(png()).decode()
        with_image = http.post("/api/generate", json={"model": "tiny-llava", "prompt": "describe", "stream": False,
                                                      "images": [image], "options": {"num_predict": 3}}).json()
        without = http.post("/api/generate", json={"model": "tiny-llava", "prompt": "describe", "stream": False,
                                                   "options": {"num_predict": 3}}).json()
        assert with_image["prompt_eval_count"] == without["prompt_eval_count"] + IMAGE_TOKENS
    finally:
        server.stop()
