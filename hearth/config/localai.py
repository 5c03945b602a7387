"""LocalAI's model YAML fields that Hearth reads but does not act on, and why: said once when a config loads.

Fields Hearth honours (`mmap`, `f16` on llama-cpp, `template.use_tokenizer_template`, `function.grammar.disable`,
the stable-diffusion.cpp `options`, …) are simply used; fields it has no use for are named here with the reason,
so a LocalAI user sees what their YAML does here instead of a bare "unknown field".
"""

from __future__ import annotations

from hearth.config.schema import SD_PATH_OPTIONS, ModelConfig
from hearth.config.speculation import OPTIONS as SPECULATION_OPTIONS

# LocalAI field (dotted) -> why Hearth does not use it.
IGNORED = {
    "function.response_regex": "tool calls are read in the formats Hearth knows (hermes, llama3, mistral, json)",
    "function.json_regex_match": "tool calls are read in the formats Hearth knows",
    "function.argument_regex": "tool calls are read in the formats Hearth knows",
    "function.argument_regex_key_name": "tool calls are read in the formats Hearth knows",
    "function.argument_regex_value_name": "tool calls are read in the formats Hearth knows",
    "function.replace_function_results": "tool calls are read in the formats Hearth knows",
    "function.replace_llm_results": "replies are not rewritten by regex",
    "function.capture_llm_results": "replies are not rewritten by regex",
    "function.return_name_in_function_response": "tool results are sent as the chat template renders them",
    "function.grammar.parallel_calls": "the request's parallel_tool_calls decides",
    "function.grammar.mixed_mode": "forced tool calls are constrained; free text is not mixed in",
    "function.grammar.disable_parallel_new_lines": "grammars are built from the tool-call format",
    "function.grammar.expect_strings_after_json": "grammars are built from the tool-call format",
    "function.grammar.no_mixed_free_string": "grammars are built from the tool-call format",
    "function.grammar.schema_type": "grammars are built from the tool-call format",
    "function.grammar.properties_order": "grammars are built from the tool-call format",
    "function.grammar.triggers": "lazy grammars wait for the format's own trigger",
    "roles": "prompts come from the Jinja chat template",
    "cutstrings": "replies are not rewritten by regex",
    "trimspace": "replies are not rewritten",
    "trimsuffix": "replies are not rewritten",
    "low_vram": "no GPU is used",
    "cuda": "no GPU is used",
    "gpu_layers": "no GPU is used",
    "main_gpu": "no GPU is used",
    "tensor_split": "no GPU is used",
    "trust_remote_code": "Hearth never runs code that comes with a model",
    "engine_args": "a vLLM setting",
    "known_input_modalities": "what a model takes is read from the model itself",
    "known_output_modalities": "what a model gives is read from the model itself",
    "pii_detection": "no PII filter here",
    "tts": "voices take their settings from the voice's own .onnx.json",
    "type": "transformers models are loaded by their own config.json",
}
# Fields whose meaning is already Hearth's behaviour: no note needed.
HONOURED = {"template.use_tokenizer_template", "function.disable_no_action",
            "function.automatic_tool_parsing_fallback", "artifacts",
            # read by the backends themselves (see each backend's docstring)
            "step", "cfg_scale", "sampler", "sizes", "diffusers", "voices", "noise_scale", "noise_w", "compute_type",
            "vad_filter", "beam_size", "onnx_file", "batch_size"}
# `options` keys each backend acts on; others are named in the note.
USED_OPTIONS = {
    "llama-cpp": {"use_jinja", *SPECULATION_OPTIONS},
    "stablediffusion-ggml": {"diffusion_model", "sampler", "scheduler", *SD_PATH_OPTIONS},
}


def _present(config: ModelConfig, dotted: str) -> bool:
    node: object = config
    for part in dotted.split("."):
        extra = getattr(node, "model_extra", None) or {}
        if part in extra:
            node = extra[part]
        elif hasattr(node, part) and part in type(node).model_fields:  # type: ignore[arg-type]
            node = getattr(node, part)
        else:
            return False
    return True


def notes(config: ModelConfig) -> tuple[list[str], list[str]]:
    """(notes on LocalAI fields this config sets that Hearth does not act on, unknown field names)."""
    said = [f"{field} ({why})" for field, why in IGNORED.items() if _present(config, field)]
    backend = config.canonical_backend
    unused = [key for key in config.option_map if key not in USED_OPTIONS.get(backend, set())]
    if unused:
        said.append(f"options {', '.join(unused)} (not used by the {backend} backend here)")
    if config.f16 is not None and backend not in ("llama-cpp",):
        said.append("f16 (CPU inference runs in the precision the backend chooses)")
    known = set(IGNORED) | HONOURED
    unknown = [name for name in config.unknown_fields() if name not in known
               and not any(name.startswith(f"{k}.") for k in known)]
    return said, unknown
