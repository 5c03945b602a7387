"""How model families write tool calls: one small reader per way of writing a call (JSON objects after a marker,
a name then JSON arguments, parameters as tagged text, Gemma's and LFM2's own syntaxes), with the JSON helpers they
share. Each reads one section of calls from a given place in the output, whole or still being written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

NAME_KEYS = ("name", "function", "tool_name")
ARGUMENT_KEYS = ("arguments", "parameters", "args")
MAX_PARALLEL_CALLS = 8


@dataclass
class Call:
    name: str
    arguments: str = ""
    id: str = ""  # the model's own id for the call, when its format has one


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[Call] = field(default_factory=list)


@dataclass
class Options:
    """What the request says about reading its output."""

    tools: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parameters schema; none: no calls read
    parallel: bool = True
    reasoning: bool = True  # split thoughts out (reasoning_format auto); False keeps them in content
    thinking_open: str = ""  # the prompt ended inside a thought: the opening marker it wrote, else ""


# -- JSON helpers ------------------------------------------------------------------------------------------


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]"]')  # (a string's body unrolled: no backtracking)


def json_end(text: str, start: int = 0) -> int | None:
    """The index just past the JSON value (object, array or string) opening at `start`, or None if it is cut off.
    (A regex steps over strings whole: output is re-read at every step of a stream, so this must be quick.)"""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, start):
        token = match.group()
        if token[0] == '"':
            if len(token) == 1:
                return None  # a string that is not closed yet
            if depth == 0:
                return match.end()
        elif token in "{[":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return match.end()
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def held(text: str, markers: list[str]) -> int:
    """How many characters at the end of `text` may be the start of one of `markers` (to hold back)."""
    keep = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), keep, -1):
            if text.endswith(marker[:n]):
                keep = n
                break
    return keep


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    """A parameter value written as bare text (XML-style calls): a string where the schema wants one, else the JSON
    value it spells when it spells one."""
    kinds = (schema or {}).get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if "string" in kinds and not (set(kinds) - {"string", "null"} and _loads(value) is not None):
        if value == "null" and "null" in kinds:
            return None
        return value
    parsed = _loads(value)
    if parsed is None and value.strip() != "null":
        return value
    return parsed


def _param_schema(options: Options, name: str, key: str) -> dict[str, Any] | None:
    properties = (options.tools.get(name) or {}).get("properties") or {}
    found = properties.get(key)
    return found if isinstance(found, dict) else None


# -- call readers -------------------------------------------------------------------------------------------
# Each reads the calls of one section starting at `start` (where its opening marker is) and returns
# (calls, end, complete): `complete` False means the text ends inside the section (partial output).


class CallSyntax:
    """How one family writes tool calls: where a section starts, and how to read it."""

    starts: tuple[str, ...] = ()

    def find(self, text: str, at: int, said: bool) -> int | None:
        found = [i for s in self.starts if (i := text.find(s, at)) >= 0]
        return min(found) if found else None

    def markers(self) -> list[str]:
        return list(self.starts)

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        raise NotImplementedError


_ARGUMENTS_KEY = re.compile(r'"(?:arguments|parameters|args)"\s*:\s*')
_NAME_FIELD = re.compile(r'"(?:name|function|tool_name)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ID_FIELD = re.compile(r'"(?:id|tool_call_id)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _raw_arguments(raw: str) -> str | None:
    """The arguments object as the model wrote it inside a call object's text (so a stream's pieces and the
    whole agree to the character)."""
    found = _ARGUMENTS_KEY.search(raw)
    if not found or raw[found.end():found.end() + 1] not in ("{", "["):
        return None
    end = json_end(raw, found.end())
    return raw[found.end():end] if end is not None else raw[found.end():].rstrip()


def _json_call(obj: Any, raw: str = "") -> Call | None:
    """A call written as a JSON object: {"name": ..., "arguments": {...}} under any of the usual key spellings, or
    Apertus' {"<name>": {...}}."""
    if not isinstance(obj, dict):
        return None
    name = next((obj[k] for k in NAME_KEYS if isinstance(obj.get(k), str)), None)
    if name is None:
        if len(obj) == 1:
            (name, arguments), = obj.items()
            return Call(name, _dump(arguments)) if isinstance(arguments, dict) else None
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {"name", "arguments"}}
        return _json_call(obj["function"])
    arguments = next((obj[k] for k in ARGUMENT_KEYS if k in obj), {})
    ident = obj.get("id", obj.get("tool_call_id", ""))
    written = _raw_arguments(raw) if raw and isinstance(arguments, dict | list) else None
    text = arguments if isinstance(arguments, str) else written if written is not None else _dump(arguments)
    return Call(name, text, str(ident or ""))


def _partial_json_call(text: str, at: int) -> Call | None:
    """The call a cut-off JSON object has begun: its name once complete, its arguments as far as written."""
    if text[at:at + 1] != "{":
        return None
    body = text[at:]
    name = _NAME_FIELD.search(body)
    if not name:
        return None
    decoded = _loads(f'"{name.group(1)}"')
    ident = _ID_FIELD.search(body)
    arguments = _raw_arguments(body) or ""
    return Call(decoded, arguments, ident.group(1) if ident else "") if isinstance(decoded, str) else None


def _item_texts(array: str) -> list[str]:
    """The text of each object in a JSON array, as written."""
    items, pos = [], 1
    while True:
        start = array.find("{", pos)
        if start < 0:
            return items
        end = json_end(array, start)
        if end is None:
            return items
        items.append(array[start:end])
        pos = end


@dataclass
class JsonCalls(CallSyntax):
    """JSON call objects (or a list of them) after an opening marker and before an optional closing one.

    `openers` each start a section; `closers` end one. `bare` also reads a call object or list that opens the
    output (models taught by a system prompt, Llama 3.x) or a ```json fence.
    """

    openers: tuple[str, ...] = ()
    closers: tuple[str, ...] = ()
    bare: bool = False
    separators: str = r"(?:\s|,|;)*"

    def __post_init__(self) -> None:
        self.starts = self.openers + (("```",) if self.bare else ())
        self._sep = re.compile(self.separators)

    def find(self, text: str, at: int, said: bool) -> int | None:
        found = super().find(text, at, said)
        if self.bare and not said:
            stripped = len(text) - len(text[at:].lstrip())
            if text[stripped:stripped + 1] in ("{", "[") and (found is None or stripped < found):
                return stripped
        return found

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        calls: list[Call] = []
        pos = start
        while True:
            opener = next((o for o in self.starts if text.startswith(o, pos)), None)
            if opener is not None:
                pos += len(opener)
                if opener == "```" and text.startswith("json", pos):
                    pos += 4
                elif opener == "```" and partial and "json".startswith(text[pos:]):
                    return calls, len(text), False  # ```js… may yet be ```json
            elif pos == start and not (self.bare and text[pos:pos + 1] in ("{", "[")):
                return None
            pos = self._sep.match(text, pos).end()
            if pos >= len(text):
                return calls, pos, False
            if text[pos] not in "{[":
                if opener is None and calls:
                    return calls, pos, True
                return None
            end = json_end(text, pos)
            if end is None:
                inside = pos + 1 if text[pos] == "[" else pos
                inside = self._sep.match(text, inside).end()
                # Whole calls already written in a list, then the one being written.
                while text[pos] == "[":
                    item_end = json_end(text, inside) if inside < len(text) and text[inside] == "{" else None
                    if item_end is None:
                        break
                    call = _json_call(_loads(text[inside:item_end]), text[inside:item_end])
                    if call is None:
                        return None
                    calls.append(call)
                    inside = self._sep.match(text, item_end).end()
                current = _partial_json_call(text, inside) if inside < len(text) else None
                if current is not None:
                    calls.append(current)
                elif not partial:
                    return None  # cut off before a call's name: not a call
                return calls, len(text), False
            value = _loads(text[pos:end])
            items = value if isinstance(value, list) else [value]
            raws = [text[pos:end]] if not isinstance(value, list) else _item_texts(text[pos:end])
            for item, raw in zip(items, raws + [""] * (len(items) - len(raws)), strict=False):
                call = _json_call(item, raw)
                if call is None:
                    return None
                calls.append(call)
            pos = end
            closer = self._sep.match(text, pos).end()
            for close in self.closers + (("```",) if self.bare else ()):
                if text.startswith(close, closer):
                    pos = closer + len(close)
                    if close in self.closers:
                        return calls, pos, True  # one block: the next opener starts a new read
                    break
                if partial and close.startswith(text[closer:]) and closer < len(text):
                    return calls, len(text), False
            nxt = self._sep.match(text, pos).end()
            if not any(text.startswith(o, nxt) for o in self.starts) and \
                    not (self.bare and text[nxt:nxt + 1] == "{" and opener is None):
                if partial and nxt < len(text) and any(o.startswith(text[nxt:]) for o in self.starts):
                    return calls, len(text), False
                return calls, pos, True
            pos = nxt


@dataclass
class NamedCalls(CallSyntax):
    """Calls written as marker, name, separator, JSON arguments, end marker (Mistral's [TOOL_CALLS]name[ARGS]{...},
    Kimi K2, DeepSeek V3.1 and R1, Functionary, GigaChat).

    `name` is a regex whose group 1 is the function name, matched right after the call marker; `id` an optional
    regex for a call id between name and arguments.
    """

    section: str = ""  # opens the section of calls (or "")
    section_end: str = ""
    call: str = ""  # opens each call
    name: str = r"(?P<name>[A-Za-z0-9_.\-]+)"
    after_arguments: str = ""  # a pattern closing each call
    first_call_bare: bool = False  # the first call may omit `call` (Functionary v3.2)

    def __post_init__(self) -> None:
        self.starts = tuple(s for s in (self.section or self.call,) if s)
        self._name = re.compile(self.name, re.S)

    def find(self, text: str, at: int, said: bool) -> int | None:
        if self.first_call_bare and not said and at == 0:
            match = self._name.match(text)
            if match and text[match.end():match.end() + 1] in ("{", "[", ""):
                return 0
            if re.fullmatch(r"[A-Za-z0-9_.\-]+\n?", text):
                return 0  # perhaps a function's name, its arguments not written yet
        return super().find(text, at, said)

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        pos = start
        if self.section:
            pos += len(self.section)
        calls: list[Call] = []
        while True:
            pos = len(text) - len(text[pos:].lstrip()) if self.section else pos
            if self.section_end and text.startswith(self.section_end, pos):
                return calls, pos + len(self.section_end), True
            if self.call and text.startswith(self.call, pos):
                pos += len(self.call)
            elif calls or not (self.first_call_bare or not self.call or (pos == start and not self.section)):
                if pos >= len(text) or (partial and any(m.startswith(text[pos:]) for m in
                                                        (self.call, self.section_end) if m)):
                    return calls, len(text), False
                return (calls, pos, True) if calls else None
            match = self._name.match(text, pos)
            if not match or match.end() >= len(text):
                if partial or self.section:
                    # Still being written, or cut off (by max_tokens) inside the section its marker opened.
                    return calls, len(text), False
                return None
            name = match.group("name")
            ident = match.group("id") if "id" in match.re.groupindex else ""
            pos = match.end()
            lead = len(text) - len(text[pos:].lstrip())
            end = json_end(text, lead) if text[lead:lead + 1] in "{[" else None
            if end is None:
                if not partial and not self.section and text[lead:lead + 1] not in ("{", "["):
                    return None
                # Arguments not begun yet (the name's pattern may still grow, as DeepSeek's "\n```json"): none.
                written = text[lead:].rstrip() if text[lead:lead + 1] in "{[" else ""
                calls.append(Call(name, written, ident or ""))
                return calls, len(text), False
            calls.append(Call(name, text[lead:end], ident or ""))
            pos = end
            if self.after_arguments:
                closing = re.compile(self.after_arguments).match(text, pos)
                if closing:
                    pos = closing.end()
                elif partial and len(text) - pos < 40 and "\n" not in text[pos:].strip():
                    return calls, len(text), False
            if not self.call and not self.section_end:
                return calls, pos, True


def _literal_prefix(pattern: str) -> str:
    """The literal text a regex begins with (`<\\|open\\|>call tool="(…` gives `<|open|>call tool="`)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            out.append(pattern[i + 1])
            i += 2
        elif ch in "\\()[].*+?{}|^$":
            break
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@dataclass
class XmlCalls(CallSyntax):
    """Calls whose parameters are written one by one as text (Qwen3-Coder, GLM, MiniMax, Seed-OSS, DeepSeek's DSML,
    MiniCPM): a section marker, each call opened with its name, each parameter between a key marker and an end
    marker; values are typed by the tool's schema."""

    section: str = ""
    section_end: str = ""
    function: str = ""  # regex: opens a call; group 1 is the name
    function_end: str = ""
    parameter: str = ""  # regex: opens a parameter; group 1 is its key
    parameter_end: str = ""
    strip_values: bool = True
    section_end_re: str = ""  # a pattern for the section's end, where one literal will not do

    def __post_init__(self) -> None:
        self._end = re.compile(self.section_end_re or re.escape(self.section_end)) if \
            self.section_end_re or self.section_end else None
        self._function = re.compile(self.function, re.S)
        self._parameter = re.compile(self.parameter, re.S)
        self.starts = (self.section,) if self.section else ()

    def find(self, text: str, at: int, said: bool) -> int | None:
        found = [i for i in (text.find(self.section, at) if self.section else -1,) if i >= 0]
        match = self._function.search(text, at)
        if match:
            found.append(match.start())
        return min(found) if found else None

    def markers(self) -> list[str]:
        literal = _literal_prefix(self.function)
        return [m for m in (self.section, literal if len(literal) >= 3 else "") if m]

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        pos = start + len(self.section) if self.section and text.startswith(self.section, start) else start
        calls: list[Call] = []
        while True:
            pos = len(text) - len(text[pos:].lstrip())
            closing = self._end.match(text, pos) if self._end else None
            if closing is None and partial and self._end is not None and text.startswith("</", pos) and \
                    "\n" not in text[pos:] and len(text) - pos < 40:
                return calls, len(text), False  # perhaps the section's end, cut off
            if closing:
                pos = closing.end()
                nxt = self.find(text, pos, True)
                if nxt is None or text[pos:nxt].strip():
                    if partial and self._maybe_prefix(text[pos:].lstrip()) and text[pos:].strip():
                        return calls, len(text), False
                    return calls, pos, True
                pos = nxt + len(self.section) if self.section and text.startswith(self.section, nxt) else nxt
                continue
            if pos >= len(text):
                return calls, pos, False
            match = self._function.match(text, pos)
            if match is None:
                if partial and (self._maybe_prefix(text[pos:]) or (len(text) - pos < 64 and not calls)):
                    return calls, len(text), False
                return (calls, pos, True) if calls else None
            name = match.group(1).strip()
            pos = match.end()
            values: list[str] = []
            while True:
                lead = len(text) - len(text[pos:].lstrip())
                if text.startswith(self.function_end, lead):
                    pos = lead + len(self.function_end)
                    calls.append(Call(name, "{" + ", ".join(values) + "}"))
                    break
                param = self._parameter.match(text, lead)
                if param is None:
                    # Still being written, or cut off (by max_tokens): the parameters read so far.
                    if lead >= len(text) or self._maybe_prefix(text[lead:], param_too=True):
                        calls.append(Call(name, "{" + ", ".join(values)))
                        return calls, len(text), False
                    return None
                key = param.group(1).strip()
                end = text.find(self.parameter_end.replace("{key}", key), param.end())
                if end < 0:
                    calls.append(Call(name, "{" + ", ".join(values)))
                    return calls, len(text), False
                raw = text[param.end():end]
                if self.strip_values:
                    raw = raw[1:] if raw.startswith("\n") else raw
                    raw = raw[:-1] if raw.endswith("\n") else raw
                value = _typed(raw, _param_schema(options, name, key))
                values.append(f"{_dump(key)}: {_dump(value)}")
                pos = end + len(self.parameter_end.replace("{key}", key))

    def _maybe_prefix(self, rest: str, param_too: bool = False) -> bool:
        """Whether `rest` may still grow into a call opener (or a parameter, or an end marker)."""
        literals = [self.function_end, self.section_end, *self.markers()]
        if param_too:
            literals.append(_literal_prefix(self.parameter))
        return any(m and (m.startswith(rest) or rest.startswith(m)) for m in literals)


_GEMMA_TOKEN = re.compile(r'<\|"\|>(.*?)<\|"\|>|([A-Za-z_][A-Za-z0-9_]*)\s*:|([^<]+?)(?=<\|"\|>|[A-Za-z_][A-Za-z0-9_]*\s*:|$)', re.S)


def _gemma_json(text: str) -> Any:
    """Gemma 4's argument object (bare keys, strings between <|"|> marks) as a JSON value, or None."""
    out = []
    for string, key, other in _GEMMA_TOKEN.findall(text):
        if key:
            out.append(_dump(key) + ":")
        elif other:
            out.append(other)
        else:
            out.append(_dump(string))
    return _loads("".join(out))


@dataclass
class GemmaCalls(CallSyntax):
    """Gemma 4: <|tool_call>call:NAME{key:value,...}<tool_call|>, strings between <|"|> marks."""

    def __post_init__(self) -> None:
        self.starts = ("<|tool_call>",)

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        calls: list[Call] = []
        pos = start
        while text.startswith("<|tool_call>", pos):
            header = re.compile(r"<\|tool_call>call:([A-Za-z0-9_.\-]+)\{").match(text, pos)
            if header is None:
                return (calls, len(text), False) if partial and len(text) - pos < 64 else None
            end = text.find("}<tool_call|>", header.end() - 1)
            if end < 0:
                return ([*calls, Call(header.group(1), "")], len(text), False) if partial else None
            value = _gemma_json(text[header.end() - 1:end + 1])
            if not isinstance(value, dict):
                return None
            calls.append(Call(header.group(1), _dump(value)))
            pos = end + len("}<tool_call|>")
        return calls, pos, True


@dataclass
class PythonicCalls(CallSyntax):
    """LFM2's calls: a Python list of calls with keyword arguments between two markers."""

    opener: str = "<|tool_call_start|>"
    closer: str = "<|tool_call_end|>"

    def __post_init__(self) -> None:
        self.starts = (self.opener,)

    def read(self, text: str, start: int, options: Options, partial: bool) -> tuple[list[Call], int, bool] | None:
        import ast

        body_start = start + len(self.opener)
        end = text.find(self.closer, body_start)
        if end < 0:
            return ([], len(text), False) if partial else None
        source = re.sub(r'("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|\b(true|false|null)\b',
                        lambda m: m.group(1) or {"true": "True", "false": "False", "null": "None"}[m.group(2)],
                        text[body_start:end].strip())
        try:
            tree = ast.parse(source, mode="eval")
        except (SyntaxError, ValueError, RecursionError):
            return None
        items = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
        calls = []
        for item in items:
            if not isinstance(item, ast.Call) or not isinstance(item.func, ast.Name | ast.Attribute):
                return None
            try:
                arguments = {k.arg: ast.literal_eval(k.value) for k in item.keywords if k.arg}
            except (ValueError, SyntaxError):
                return None
            name = item.func.id if isinstance(item.func, ast.Name) else ast.unparse(item.func)
            calls.append(Call(name, _dump(arguments)))
        return calls, end + len(self.closer), True
