"""Tool calling: the model families' call formats, the grammar that forces a call, and the parser that turns
generated text (whole or streamed) back into OpenAI `tool_calls`.

Formats, chosen from the chat template or set in the model YAML (`function: {tool_format: ...}`):

- `hermes` (Qwen 2.5, Hermes, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- `llama3`: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
- `json` (any other model; the tools are described in the system prompt): `{"name": ..., "arguments": {...}}`,
  or a list of them

The parser accepts every one of these shapes whatever the format (and a call in a ```json code fence), so a model
that answers in a neighbouring dialect still gets its calls parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from hearth.chat.grammar import GrammarBuilder, literal, strict_schema

FORMATS = ("hermes", "llama3", "mistral", "json")
MAX_PARALLEL_CALLS = 8
# Small models often wrap a call in a Markdown code fence instead of their format's tags: read that too.
MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "```")
SEPARATOR = re.compile(
    r"(?:\[TOOL_CALLS\]|</?tool_call>|<\|python_tag\|>|<\|eom_id\|>|```(?:json)?|\s|,|;|\[|\])+")
SEPARATOR_TOKENS = ("</tool_call>", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<|eom_id|>", "```json")
NAME_KEYS = ("name", "function")
ARGUMENT_KEYS = ("arguments", "parameters")


def _header(name_keys: tuple[str, ...], argument_keys: tuple[str, ...]) -> re.Pattern[str]:
    """Matches the start of a call object up to its arguments value: `{"name": "f", "arguments": `."""
    names = "|".join(re.escape(k) for k in name_keys)
    arguments = "|".join(re.escape(k) for k in argument_keys)
    return re.compile(rf'\{{\s*"(?:{names})"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:{arguments})"\s*:\s*')


def detect_format(template: str) -> str:
    """The tool-call format a chat template teaches its model."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return "llama3"
    return "json"


def template_takes_tools(template: str) -> bool:
    """Whether the template renders a `tools` list itself (else Hearth describes the tools in the system prompt)."""
    return re.search(r"\btools\b", template) is not None


def arguments_mapping(text: str) -> dict[str, Any]:
    """A call's arguments as the object APIs that take them parsed want (Ollama, Anthropic); arguments that are
    not a JSON object (a reply cut off by max_tokens mid-call) become an empty object rather than an error."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- prompts ---------------------------------------------------------------------------------------------


def system_prompt_for(tools: list[dict[str, Any]], parallel: bool) -> str:
    """Tool instructions for a model whose template has no tools section."""
    described = "\n".join(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                      "parameters": t.get("parameters", {})}, ensure_ascii=False) for t in tools)
    many = " To call several, answer with a JSON list of such objects." if parallel else ""
    return ("You can call these functions:\n" + described + "\n\nTo call a function, answer with only a JSON object "
            '{"name": <function name>, "arguments": <an object of arguments>}.' + many +
            " Otherwise answer normally.")


def call_text(fmt: str, calls: list[dict[str, Any]]) -> str:
    """How an earlier assistant turn's calls read in the model's own format (for templates without tools)."""
    objects = [{"name": c["name"], ("parameters" if fmt == "llama3" else "arguments"): c["arguments"]}
               for c in calls]
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps(o, ensure_ascii=False)}\n</tool_call>" for o in objects)
    if fmt == "mistral":
        return "[TOOL_CALLS] " + json.dumps(objects, ensure_ascii=False)
    if len(objects) == 1:
        return json.dumps(objects[0], ensure_ascii=False)
    return json.dumps(objects, ensure_ascii=False)


# -- grammar ---------------------------------------------------------------------------------------------


def tool_call_grammar(fmt: str, tools: list[dict[str, Any]], parallel: bool, content_rule: str | None = None,
                      builder: GrammarBuilder | None = None, name_key: str = "name",
                      arguments_key: str | None = None, lazy: bool = False) -> str:
    """GBNF forcing one call (or, with `parallel`, one or more) to one of `tools`, in the model's format.

    `content_rule`, a rule already in `builder`, is offered as the alternative to calling (tool_choice auto with
    a response_format). `lazy` makes the grammar for tool_choice auto, applied only from a trigger on (see
    `lazy_triggers`): it then also accepts bare calls, which is where the start-of-output trigger hands over.
    """
    builder = builder or GrammarBuilder()
    key = arguments_key or ("parameters" if fmt == "llama3" else "arguments")
    space = builder.primitive("space")
    alternatives = []
    for i, tool in enumerate(tools):
        parameters = tool.get("parameters") or {"type": "object"}
        arguments = builder.schema(strict_schema(parameters) if tool.get("strict") else parameters,
                                   f"tool-{i}-arguments", f"tools[{i}].function.parameters")
        alternatives.append(builder.add(
            f"tool-{i}-call",
            f'"{{" {space} {literal(json.dumps(name_key))} {space} ":" {space} {literal(json.dumps(tool["name"]))} '
            f'{space} "," {space} {literal(json.dumps(key))} {space} ":" {space} {arguments} {space} "}}"'))
    call = builder.add("call", " | ".join(alternatives))
    more = f"{{0,{MAX_PARALLEL_CALLS - 1}}}"  # a model that keeps calling is stopped after MAX_PARALLEL_CALLS
    if fmt == "hermes":
        one = builder.add("tagged-call", f'"<tool_call>\\n" {call} "\\n</tool_call>"')
        root = f'{one} ( "\\n" {one} ){more}' if parallel else one
    elif fmt == "mistral":
        root = f'"[" {space} {call} ( {space} "," {space} {call} ){more} {space} "]"' if parallel else \
            f'"[" {space} {call} {space} "]"'
    else:  # one object per line: after each the model may stop, which a JSON list does not offer
        root = f'{call} ( "\\n" {call} ){more}' if parallel else call
    if lazy:
        # A bare call may sit in a ``` fence that the grammar let open: it may close it.
        bare = (f'{call} ( "\\n" {call} ){more}' if parallel else call) + ' ( "\\n"? "```" )?'
        tagged = {"hermes": root, "mistral": f'"[TOOL_CALLS]" {space} {root}',
                  "llama3": f'"<|python_tag|>" {space} ( {bare} )'}.get(fmt)
        root = " | ".join(f"( {r} )" for r in (tagged, bare) if r)
    if content_rule is not None:
        root = f"( {root} ) | {content_rule}"
    return builder.render(root)


def lazy_triggers(fmt: str, names: list[str], name_key: str = "name") -> list[str]:
    """Where a lazy tool-call grammar takes hold: the format's opening tag anywhere, or a JSON object naming one
    of the tools, opening the output or a ``` fence, from its brace on. Other JSON stays free content."""
    tags = {"hermes": r"(<tool_call>)", "mistral": r"(\[TOOL_CALLS\])", "llama3": r"(<\|python_tag\|>)"}
    keys = "|".join(re.escape(k) for k in dict.fromkeys((name_key, *NAME_KEYS)))
    call = rf'(\{{\s*"(?:{keys})"\s*:\s*"(?:{"|".join(re.escape(n) for n in names)})")'
    triggers = [rf"^\s*{call}", rf"```(?:json)?\s*{call}"]
    return [tags[fmt], *triggers] if fmt in tags else triggers


# -- parsing ---------------------------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first for each call has its id and name, the rest argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


def _json_end(text: str, depth: int = 0, in_string: bool = False, escaped: bool = False) -> tuple[int | None, tuple]:
    """Scan JSON text for the point where nesting returns to zero; returns (end index or None, scanner state)."""
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1, (0, False, False)
    return None, (depth, in_string, escaped)


def _partial_token(text: str) -> int | None:
    """Where the text ends with the beginning (not the whole) of a tag such as `</tool_call>`, if it does."""
    # (A bare ``` counts as begun too: it may yet become ```json.)
    for i, ch in enumerate(text):
        if ch in "[<`":
            rest = text[i:]
            if any(t.startswith(rest) and t != rest for t in SEPARATOR_TOKENS):
                return i
    return None


@dataclass
class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally.

    `feed()` takes text as it is generated and returns events: strings (content) and `ToolCallDelta`s. `close()`
    ends the stream. Text that turns out not to be a valid call to a known tool is given back as content.
    """

    names: set[str]
    parallel: bool = True
    name_key: str = "name"
    arguments_key: str = "arguments"
    calls: list[ParsedCall] = field(default_factory=list)
    _mode: str = "content"  # "content", "calls" or "done" (one call was all that was allowed)
    _held: str = ""  # content mode: text that may start a marker or a bare JSON call
    _said_something: bool = False  # content mode: non-blank text was already given out as content
    _buf: str = ""  # calls mode: text not yet consumed
    _section: str = ""  # calls mode: the whole section's text, given back as content if it fails to parse
    _streaming: ParsedCall | None = None  # the call whose arguments are being streamed
    _scan: tuple = (0, False, False)
    _closing: bool = False  # arguments done; consuming the rest of the call object
    _events: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._name_keys = tuple(dict.fromkeys((self.name_key, *NAME_KEYS)))
        self._argument_keys = tuple(dict.fromkeys((self.arguments_key, *ARGUMENT_KEYS)))
        self._header = _header(self._name_keys, self._argument_keys)

    def feed(self, text: str) -> list[Any]:
        self._events = []
        if self._mode == "content":
            self._content(text)
        elif self._mode == "calls":
            self._buf += text
            self._section += text
            self._advance()
        return self._events

    def close(self) -> list[Any]:
        self._events = []
        if self._mode == "content" and self._held:
            held, self._held = self._held, ""
            if held.strip():
                self._emit_content(held)
        elif self._mode == "calls":
            self._advance(final=True)
            if self._mode == "calls" and self._streaming is None and self._buf.strip() and \
                    not SEPARATOR.fullmatch(self._buf):
                self._fail(len(self._buf))
        return self._events

    def _emit_content(self, text: str) -> None:
        if text:
            self._events.append(text)
            if text.strip():
                self._said_something = True

    def _content(self, text: str) -> None:
        text = self._held + text
        self._held = ""
        found = [(i, m) for m in MARKERS if (i := text.find(m)) >= 0]
        bare = None
        if not self._said_something:
            stripped = text.lstrip()
            if stripped[:1] in ("{", "["):
                bare = len(text) - len(stripped)
        starts = [i for i, _ in found] + ([bare] if bare is not None else [])
        if starts:
            start = min(starts)
            if not self._said_something and not text[:start].strip():
                start = 0  # leading blanks go with the call: given back only if it turns out not to be one
            self._emit_content(text[:start])
            self._mode = "calls"
            self._buf = self._section = text[start:]
            self._advance()
            return
        if not self._said_something and not text.strip():
            self._held = text  # blank so far: a bare JSON call may follow
            return
        keep = 0
        for marker in MARKERS:
            for n in range(min(len(marker) - 1, len(text)), keep, -1):
                if text.endswith(marker[:n]):
                    keep = n
                    break
        self._emit_content(text[: len(text) - keep])
        self._held = text[len(text) - keep:]

    def _fail(self, upto: int) -> None:
        """What was read is not a call after all: it is content, up to `upto` characters into the unconsumed
        text; the text after that is read again as content (it may hold further calls). Calls completed before
        stand."""
        consumed = self._section[: len(self._section) - len(self._buf)]
        head, rest = self._buf[:upto], self._buf[upto:]
        self._mode = "content"
        self._buf = self._section = ""
        self._said_something = True
        self._emit_content(consumed + head)
        if rest:
            self._content(rest)

    def _start_call(self, name: str, upto: int) -> ParsedCall | None:
        if name not in self.names:
            self._fail(upto)
            return None
        if self.calls and not self.parallel:
            self._mode = "done"  # one call only: the rest is dropped
            self._buf = ""
            return None
        call = ParsedCall(id=new_call_id(), name=name)
        self.calls.append(call)
        self._events.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, name=name))
        return call

    def _arguments(self, call: ParsedCall, piece: str) -> None:
        if piece:
            call.arguments += piece
            self._events.append(ToolCallDelta(index=self.calls.index(call), arguments=piece))

    def _advance(self, final: bool = False) -> None:
        while self._mode == "calls":
            if self._streaming is not None:
                if not self._stream_arguments():
                    return
                continue
            if self._closing:
                end, self._scan = _json_end(self._buf, *self._scan)
                if end is None:
                    self._buf = ""
                    return
                self._buf = self._buf[end:]
                self._closing = False
                self._section = self._buf
                continue
            match = SEPARATOR.match(self._buf)
            consumed = match.end() if match else 0
            cut = None if final else _partial_token(self._buf)
            if cut is not None and cut <= consumed:
                self._buf = self._buf[cut:]
                return  # perhaps the start of a tag: wait for the rest
            self._buf = self._buf[consumed:]
            if not self._buf:
                return
            if not self._buf.startswith("{"):
                self._fail(0)
                return
            header = self._header.match(self._buf)
            if header:
                try:
                    name = json.loads(f'"{header.group(1)}"')
                except json.JSONDecodeError:
                    self._fail(header.end())
                    return
                call = self._start_call(name, header.end())
                if call is None:
                    return
                self._buf = self._buf[header.end():]
                self._streaming, self._scan = call, (0, False, False)
                continue
            end, _ = _json_end(self._buf)
            if end is None:
                return  # wait: the header may still come, or the object end
            try:
                obj = json.loads(self._buf[:end])
            except json.JSONDecodeError:
                self._fail(end)
                return
            name = next((obj[k] for k in self._name_keys if k in obj), None) if isinstance(obj, dict) else None
            arguments = next((obj[k] for k in self._argument_keys if k in obj), {}) if isinstance(obj, dict) else None
            if not isinstance(name, str):
                self._fail(end)
                return
            call = self._start_call(name, end)
            if call is None:
                return
            self._arguments(call, arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                          ensure_ascii=False))
            self._buf = self._buf[end:]
            self._section = self._buf

    def _stream_arguments(self) -> bool:
        """Hand on argument text up to the end of the arguments value; True once it is complete."""
        call = self._streaming
        assert call is not None
        if not call.arguments:
            stripped = self._buf.lstrip()
            if not stripped:
                self._buf = ""
                return False
            self._buf = stripped
            if stripped[0] not in "{[":
                # Arguments that are not an object: take everything up to the call object's end.
                end, _ = _json_end("{" + stripped)
                if end is None:
                    return False
                value = stripped[: end - 2].rstrip()
                self._arguments(call, value)
                self._buf = stripped[end - 1:]
                self._streaming = None
                self._section = self._buf
                return True
        end, self._scan = _json_end(self._buf, *self._scan)
        if end is None:
            self._arguments(call, self._buf)
            self._buf = ""
            return False
        self._arguments(call, self._buf[:end])
        self._buf = self._buf[end:]
        self._streaming = None
        self._closing, self._scan = True, (1, False, False)
        return True
