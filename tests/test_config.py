"""The models directory: YAML configs, loose files, aliases, and the checks on paths and backends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hearth.config.loader import ModelRegistry, resolve_inside
from hearth.errors import ConfigError, ModelDisabled, ModelNotFound


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_localai_yaml_fields(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    write(tmp_path, "m.yaml", """
name: my-model
backend: llama-cpp
parameters:
  model: m.gguf
  temperature: 0.2
  top_p: 0.9
  top_k: 20
  max_tokens: 100
  seed: 5
context_size: 4096
threads: 3
stopwords: ["<|end|>"]
template:
  chat: "{% for m in messages %}{{ m.content }}{% endfor %}"
alias: gpt-4
description: a model
known_usecases: [chat]
""")
    config = ModelRegistry(tmp_path).get("gpt-4")
    assert config.name == "my-model" and config.alias == ["gpt-4"]
    assert config.parameters.temperature == 0.2 and config.parameters.top_k == 20 and config.parameters.seed == 5
    assert config.context_size == 4096 and config.threads == 3 and config.stopwords == ["<|end|>"]
    assert config.model_path == str((tmp_path / "m.gguf").resolve())
    assert config.canonical_backend == "llama-cpp"


def test_unknown_fields_are_kept_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    write(tmp_path, "m.yaml", "name: m\nbackend: llama\nparameters: {model: m.gguf, mirostat: 2}\nmystery_knob: 3\n"
                              "f16: true\nlow_vram: true\nfunction: {response_regex: ['<f=(?P<name>\\\\w+)>']}\n")
    with caplog.at_level(logging.INFO):
        registry = ModelRegistry(tmp_path)
        config = registry.get("m")
        registry.refresh(force=True)
    assert config.model_extra == {"mystery_knob": 3, "low_vram": True} and config.f16 is True
    assert config.parameters.model_extra == {"mirostat": 2}
    assert "unknown field 'mystery_knob'" in caplog.text and "unknown field 'parameters.mirostat'" in caplog.text
    # LocalAI's own fields are named with the reason they do nothing here, once however often the folder is read.
    assert "unknown field 'low_vram'" not in caplog.text and "unknown field 'function" not in caplog.text
    assert caplog.text.count("low_vram (no GPU is used)") == 1
    assert "function.response_regex (tool calls are read in the formats Hearth knows" in caplog.text
    assert config.canonical_backend == "llama-cpp"  # LocalAI's older name


def test_broken_yaml_reported_with_line_and_others_still_load(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", "name: good\nbackend: fake\n")
    write(tmp_path, "bad.yaml", "name: bad\nbackend: fake\nparameters:\n  temperature: [unclosed\n")
    table = ModelRegistry(tmp_path).refresh()
    assert list(table.configs) == ["good"]
    (problem,) = table.errors
    assert problem.file.endswith("bad.yaml") and problem.line == 5
    assert "bad.yaml:5" in str(problem)


def test_invalid_field_value_names_field_and_line(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "name: m\nbackend: fake\ncontext_size: lots\n")
    registry = ModelRegistry(tmp_path)
    (problem,) = registry.refresh().errors
    assert "context_size" in problem.reason and problem.line == 3
    with pytest.raises(ModelNotFound) as caught:
        registry.get("m")
    assert "config was refused" in caught.value.message


@pytest.mark.parametrize("model", ["../outside.gguf", "/etc/passwd", "sub/../../x.gguf"])
def test_paths_outside_models_dir_refused(tmp_path: Path, model: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write(models, "m.yaml", f"name: m\nbackend: llama-cpp\nparameters:\n  model: {model}\n")
    (problem,) = ModelRegistry(models).refresh().errors
    assert "models directory" in problem.reason


def test_symlink_escaping_models_dir_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    (models / "link.gguf").symlink_to(tmp_path / "secret.gguf")
    with pytest.raises(ConfigError, match="outside the models directory"):
        resolve_inside(models, "link.gguf")


def test_unknown_backend_refused_with_known_list(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "name: m\nbackend: tensorflow-magic\nparameters: {model: m.bin}\n")
    (problem,) = ModelRegistry(tmp_path).refresh().errors
    assert "unknown backend 'tensorflow-magic'" in problem.reason and "llama-cpp" in problem.reason


def test_backend_inferred_from_gguf(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "name: m\nparameters: {model: m.gguf}\n")
    assert ModelRegistry(tmp_path).get("m").canonical_backend == "llama-cpp"


def test_loose_gguf_served_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    (tmp_path / "used.gguf").write_bytes(b"GGUF")
    write(tmp_path, "used.yaml", "name: configured\nparameters: {model: used.gguf}\n")
    registry = ModelRegistry(tmp_path)
    names = sorted(c.name for c in registry.models())
    assert names == ["configured", "tiny"]  # a file a YAML uses is not listed twice
    assert registry.get("tiny.gguf").name == "tiny"


def test_go_template_gets_a_hint(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "name: m\nbackend: fake\ntemplate:\n  chat: '{{.Input}}'\n")
    (problem,) = ModelRegistry(tmp_path).refresh().errors
    assert "Go template" in problem.reason


def test_duplicate_names_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: one\nbackend: fake\n")
    write(tmp_path, "b.yaml", "name: two\nbackend: fake\nalias: one\n")
    table = ModelRegistry(tmp_path).refresh()
    assert list(table.configs) == ["one"]
    assert "already used" in table.errors[0].reason


def test_disabled_and_missing(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: off\nbackend: fake\ndisabled: true\n")
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ModelDisabled):
        registry.get("off")
    with pytest.raises(ModelNotFound) as caught:
        registry.get("nope")
    assert "installed models: off" in caught.value.message


def test_new_configs_seen_without_restart(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.models() == []
    write(tmp_path, "a.yaml", "name: later\nbackend: fake\n")
    assert registry.get("later").name == "later"


def test_localai_off_values_and_speculative_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """LocalAI's llama.cpp "off" spellings read as off; draft_model and the spec_* options are read and checked; a
    draft file must stay inside the models directory like the model."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "draft.gguf").write_bytes(b"GGUF")
    write(tmp_path, "m.yaml", """
name: m
parameters: {model: m.gguf, top_k: -1, seed: -1, max_tokens: 0, repeat_last_n: -1, typical_p: 0}
draft_model: draft.gguf
options: ["use_jinja:true", "spec_type:draft-simple", "spec_n_max:6", "spec_p_min:0.75"]
f16: true
""")
    write(tmp_path, "bad-spec.yaml", "name: bad-spec\nparameters: {model: m.gguf}\noptions: ['spec_n_max:lots']\n")
    write(tmp_path, "far-draft.yaml", "name: far-draft\nparameters: {model: m.gguf}\ndraft_model: ../../elsewhere.gguf\n")
    with caplog.at_level(logging.INFO):
        registry = ModelRegistry(tmp_path)
        config = registry.get("m")
    p = config.parameters
    assert (p.top_k, p.seed, p.max_tokens, p.repeat_last_n, p.typical_p) == (0, None, None, None, None)
    speculation = config.speculative
    assert speculation is not None and (speculation.kind, speculation.n_max, speculation.p_min) == (
        "draft-simple", 6, 0.75)
    assert config.part_paths["draft_model"] == str((tmp_path / "draft.gguf").resolve())
    assert "Hearth does not use" not in caplog.text  # every field of m is acted on
    with pytest.raises(ModelNotFound, match="spec_n_max: 'lots' is not a number"):
        registry.get("bad-spec")
    with pytest.raises(ModelNotFound, match="draft_model path"):
        registry.get("far-draft")
