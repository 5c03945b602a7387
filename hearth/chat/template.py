"""Rendering a model's Jinja chat template the way Hugging Face's tokenizers do."""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import SandboxedEnvironment

from hearth.errors import InvalidRequest

_GO_TEMPLATE = re.compile(r"\{\{-?\s*\.[A-Za-z]")


class TemplateRaised(Exception):
    """The template itself called raise_exception (e.g. "roles must alternate")."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    if isinstance(value, Iterator):  # a filter chain (map, selectattr) hands on a generator
        value = list(value)
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


class GenerationTag(Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens for training masks);
    rendering, it is its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    # Sandboxed (no attribute access outside data, no I/O), but lists may be appended to: templates build their own
    # lists (Kimi's, Laguna's), and they only ever hold the copies of the request made for this render.
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    return _environment().from_string(source)


def check_template(source: str) -> str | None:
    """Why `source` cannot be used as a chat template, or None when it compiles."""
    try:
        _compile(source)
    except TemplateSyntaxError as exc:
        hint = ""
        if _GO_TEMPLATE.search(source):
            hint = (" (this looks like a LocalAI Go template; Hearth uses Jinja chat templates: remove "
                    "template.chat to use the model's own template, or rewrite it in Jinja)")
        return f"invalid Jinja at line {exc.lineno}: {exc.message}{hint}"
    return None


def _text_of(content: Any, image_marker: str = "") -> str:
    """Content as plain text: a string, or the text parts of a list joined by newlines, with `image_marker` where
    each image goes when one is given (llama.cpp's multimodal prompts), else without the images."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif image_marker and isinstance(part, dict) and part.get("type") in ("image_url", "image"):
            parts.append(image_marker)
    return "\n".join(parts)


def arguments_object(arguments: Any) -> Any:
    """Templates index tool-call arguments as objects; OpenAI sends them as JSON strings."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _parts_of(content: Any) -> Any:
    """Content for a multimodal template: text and image parts in order (an image as {"type": "image"})."""
    if not isinstance(content, list):
        return content or ""
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif isinstance(part, dict) and part.get("type") in ("image_url", "image"):
            parts.append({"type": "image"})
    return parts


def normalize_messages(messages: list[dict[str, Any]], keep_parts: bool = False,
                       media_marker: str = "") -> list[dict[str, Any]]:
    """OpenAI messages in the shape chat templates expect: content lists kept as parts for multimodal templates
    (an image as {"type": "image"}), or text with `media_marker` where each image goes, or plain text."""
    normalized = []
    for message in messages:
        item = {key: value for key, value in message.items() if value is not None}
        content = message.get("content")
        item["content"] = _parts_of(content) if keep_parts and not media_marker else _text_of(content, media_marker)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                function["arguments"] = arguments_object(function.get("arguments"))
                call["function"] = function
                calls.append(call)
            item["tool_calls"] = calls
        normalized.append(item)
    return normalized


def _short_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call ids as 9 letters and digits, the same for a call and its result."""
    def short(ident: str) -> str:
        if len(ident) == 9 and ident.isalnum():
            return ident
        digest = hashlib.sha256(ident.encode()).digest()
        alphabet = string.ascii_letters + string.digits
        return "".join(alphabet[b % len(alphabet)] for b in digest[:9])

    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [{**c, "id": short(str(c.get("id") or ""))} for c in message["tool_calls"]]
        if message.get("tool_call_id"):
            message["tool_call_id"] = short(str(message["tool_call_id"]))
        out.append(message)
    return out


def _system_in_user(context: dict[str, Any]) -> dict[str, Any] | None:
    """For templates that refuse a system role (Gemma 2): the system prompt opens the first user message."""
    messages = context["messages"]
    if not messages or messages[0].get("role") != "system" or not isinstance(messages[0].get("content"), str):
        return None
    rest = [dict(m) for m in messages[1:]]
    for message in rest:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = messages[0]["content"] + "\n\n" + message["content"]
            break
    return {**context, "messages": rest}


def _string_arguments(context: dict[str, Any]) -> dict[str, Any] | None:
    """For templates that write call arguments as given (FireFunction, Functionary): arguments as JSON text."""
    messages = []
    changed = False
    for message in context["messages"]:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                            ensure_ascii=False)}}
                if not isinstance(c.get("function", {}).get("arguments"), str) else c for c in message["tool_calls"]]}
            changed = True
        messages.append(message)
    return {**context, "messages": messages} if changed else None


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    strip_bos: bool = False,
    keep_parts: bool = False,
    media_marker: str = "",
    **extra: Any,
) -> str:
    """The prompt text for `messages`; InvalidRequest when the template refuses them.

    strip_bos drops a leading BOS the template wrote, for tokenizers that add BOS themselves (as llama.cpp
    does), so the prompt does not start with two.
    """
    try:
        template = _compile(source)
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"the model's chat template is invalid: {exc.message}") from None
    context = {
        "messages": normalize_messages(messages, keep_parts, media_marker),
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_generation_prompt": add_generation_prompt,
        **extra,
    }
    if tools:
        context["tools"] = tools
    # FireFunction's template reads the tools as JSON text from `functions` (and needs it even without tools).
    context.setdefault("functions", json.dumps([t.get("function", t) for t in tools or []], ensure_ascii=False))
    context.setdefault("datetime", datetime.now().strftime("%b %d %Y"))  # and today's date from `datetime`
    if "length 9" in source:  # Mistral's templates take only 9-character alphanumeric call ids
        context["messages"] = _short_call_ids(context["messages"])
    first: Exception | None = None
    for attempt in (context, _system_in_user(context), _string_arguments(context)):
        if attempt is None:
            continue
        try:
            text = template.render(**attempt)
            break
        except Exception as exc:  # a third-party template can fail in any way on unexpected messages
            first = first or exc
    else:
        if isinstance(first, TemplateRaised):
            raise InvalidRequest(f"the model's chat template refused these messages: {first}",
                                 param="messages") from None
        raise InvalidRequest(f"the model's chat template failed on these messages: {first}", param="messages") from None
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    return text
