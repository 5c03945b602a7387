"""The typed chat request every API adapter builds, and the typed events `chat.serving` answers with.

Messages keep one canonical shape whatever API they came from: `{"role": "system"|"user"|"assistant"|"tool",
"content": str | [{"type": "text", "text"} | {"type": "image_url", "image_url": {"url"}}] | None,
"tool_calls": [{"id", "type": "function", "function": {"name", "arguments": str}}], "tool_call_id", "name",
"reasoning_content": str}`, which is what chat templates read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclass
class Reasoning:
    """What the client asked of the model's thinking."""

    effort: str | None = None  # one of REASONING_EFFORTS; "none" turns thinking off where the template can
    budget: int | None = None  # thought tokens before the end-of-thinking marker is forced; 0: none; -1: no limit
    split: bool | None = None  # reasoning_format: False keeps thoughts in the answer; None: the model YAML's


@dataclass
class ChatRequest:
    """One chat request, in no API's wire format. Sampling fields are named as in `SamplingRequest`."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)  # {"name", "description", "parameters", "strict"}
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    legacy_functions: bool = False  # OpenAI's functions/function_call: one call, answered as function_call
    response_format: dict[str, Any] | None = None  # OpenAI's shape: {"type": "json_schema", "json_schema": {...}}
    grammar: str | None = None
    reasoning: Reasoning = field(default_factory=Reasoning)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    logit_bias: dict[str, float] | None = None
    speculative_type: str | None = None  # llama-server's speculative.type and speculative.n_max
    speculative_n_max: int | None = None
    request_id: str = ""  # the id the client sees, to name the generation in the runner's logs
    # Where the adapter's own names differ from OpenAI's, the param to name in errors.
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        return self.params.get(name, name)


# -- events --------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.reasoning_tokens += other.reasoning_tokens


@dataclass
class Started:
    """Generation has begun for a choice; `prompt` is the prompt's usage when the backend counts it early."""

    choice: int
    prompt: Usage | None = None


@dataclass
class TextDelta:
    choice: int
    text: str
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's logprobs.content entries of the step


@dataclass
class ReasoningDelta:
    choice: int
    text: str


@dataclass
class ToolCallStarted:
    choice: int
    index: int
    id: str
    name: str


@dataclass
class ToolArgumentsDelta:
    choice: int
    index: int
    text: str


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it (may be cut off when finish is "length")


@dataclass
class Message:
    """A choice's whole answer, as read once at its end."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Finished:
    """A choice is done: why ("stop", "length", "tool_calls"), its usage and speed, the stop string that ended it,
    and the whole message, so an encoder never puts deltas back together itself."""

    choice: int
    reason: str
    usage: Usage
    timings: dict[str, Any]
    stop_sequence: str
    message: Message


ChatEvent = Started | TextDelta | ReasoningDelta | ToolCallStarted | ToolArgumentsDelta | Finished
