"""Reading a model's output: its thoughts, its answer and its tool calls, in the format its template taught it.

`parse(text, syntax, options)` reads the whole output so far (`partial` while it is still being generated: a marker
cut in half is held back, a call not yet decidable is not given out). `OutputReader` turns successive partial
parses into deltas, so a stream never gives out text it would later take back. The families and their markers are
facts from llama.cpp's chat parser tests (tests/data/llama-chat/cases.json); the code is our own, one small reader
per way of writing a call, chosen by `family_of(template)`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
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


def _held(text: str, markers: list[str]) -> int:
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


# -- families -----------------------------------------------------------------------------------------------


@dataclass
class Family:
    """A model family's output format: its thought markers and its way of writing calls."""

    name: str
    think: tuple[str, ...] = ()  # (opening marker, closing marker, other closing markers...)
    calls: CallSyntax | None = None
    special: Callable[[str, Options, bool], Parsed] | None = None  # a format read whole (gpt-oss's channels)
    unwrap: tuple[str, ...] = ()  # markers around the answer, not part of it (Command R's <|START_RESPONSE|>)
    lead: tuple[str, ...] = ()  # words that may open the answer and are not part of it (Functionary's "all")
    special_markers: tuple[str, ...] = ()  # a whole-output format's markup (gpt-oss's)
    noise: str = ""  # a separator the model writes between its markup, read as nothing (MiniMax M3)


def markup(family: Family) -> list[str]:
    """The markers of a family's calls that must never reach an answer."""
    if family.calls is None:
        return list(family.special_markers)
    return [m for m in family.calls.markers() if len(m) > 3]


def _harmony(text: str, options: Options, partial: bool) -> Parsed:
    """gpt-oss: messages `<|channel|>NAME [to=RECIPIENT] [<|constrain|>json]<|message|>BODY`, ended by <|end|>,
    <|call|> or <|return|>, the next opened by <|start|>assistant. `analysis` is thought, `final` (and commentary
    to no one) the answer, a message to `functions.NAME` a call; messages to built-in tools are dropped."""
    result = Parsed()
    pieces = re.split(r"<\|(?:end|call|return|eom|eot)\|>|<\|start\|>assistant", text)
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        if partial and last:
            piece = piece[: len(piece) - _held(piece, ["<|end|>", "<|call|>", "<|return|>", "<|start|>assistant",
                                                       "<|eom|>", "<|eot|>",
                                                       "<|message|>", "<|channel|>"])]
        head, sep, body = piece.partition("<|message|>")
        if not sep:
            if not head.strip() or (partial and last) or "<|channel|>" in head or "to=" in head:
                continue  # nothing, or a message's header whose body never came (cut off)
            body, head = head, ""
        channel = re.search(r"<\|channel\|>\s*(\w+)", head)
        recipient = re.findall(r"to=([\w.\-]+)", head)
        kind = channel.group(1) if channel else "final"
        if recipient and recipient[-1] == "self":  # Muse's thought channel
            kind, recipient = "analysis", []
        if recipient and recipient[-1] not in ("assistant", "user"):
            target = recipient[-1]
            if options.tools:
                name = target.removeprefix("functions.")
                if name in options.tools:
                    result.calls.append(Call(name, body.strip()))
            continue
        if kind == "analysis":
            if options.reasoning:
                result.reasoning += body
            else:
                result.content += f"<|channel|>analysis<|message|>{body}<|end|>"
        else:
            result.content += body
    return result


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("gpt-oss", special=_harmony,
           special_markers=("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|call|>", "<|constrain|>")),
    Family("gemma4", ("<|channel>thought", "<channel|>"), GemmaCalls(), unwrap=("<|channel>thought", "<channel|>",
                                                                              "<|channel>")),
    Family("minimax-m3", ("<mm:think>", "</mm:think>"),
           XmlCalls(section="<tool_call>", section_end="</tool_call>", function=r'<invoke name="([^"]+)">',
                    function_end="</invoke>", parameter=r"<([A-Za-z_][A-Za-z0-9_\-]*)>", parameter_end="</{key}>",
                    strip_values=False), noise="]<]minimax[>["),
    Family("kimi-k3", ("<|open|>think<|sep|>", "<|close|>think<|sep|>"),
           XmlCalls(section="<|open|>tools<|sep|>", section_end="<|close|>tools<|sep|>",
                    function=r'<\|open\|>call tool="([^"]+)"[^<]*<\|sep\|>', function_end="<|close|>call<|sep|>",
                    parameter=r'<\|open\|>argument key="([^"]+)"[^<]*<\|sep\|>',
                    parameter_end="<|close|>argument<|sep|>", strip_values=False),
           unwrap=("<|open|>response<|sep|>", "<|close|>response<|sep|>", "<|close|>message<|sep|>")),
    Family("qwen3-coder", ("<think>", "</think>"),
           XmlCalls(section="<tool_call>", section_end="</tool_call>", function=r"<function=([^>\n]+)>",
                    function_end="</function>", parameter=r"<parameter=([^>\n]+)>", parameter_end="</parameter>")),
    Family("seed-oss", ("<seed:think>", "</seed:think>"),
           XmlCalls(section="<seed:tool_call>", section_end="</seed:tool_call>", function=r"<function=([^>\n]+)>",
                    function_end="</function>", parameter=r"<parameter=([^>\n]+)>", parameter_end="</parameter>")),
    Family("glm", ("<think>", "</think>"),
           XmlCalls(section="", function=r"<tool_call>\s*([^<\n]+?)\s*(?=<arg_key>|</tool_call>|\n)",
                    function_end="</tool_call>", parameter=r"<arg_key>([^<]*)</arg_key>\s*<arg_value>",
                    parameter_end="</arg_value>", strip_values=False), unwrap=("<|role_end|>",)),
    Family("minimax-m2", ("<think>", "</think>"),
           XmlCalls(section="<minimax:tool_call>", section_end="</minimax:tool_call>",
                    function=r'<invoke name="([^"]+)">', function_end="</invoke>",
                    parameter=r'<parameter name="([^"]+)">', parameter_end="</parameter>")),
    Family("deepseek-dsml", ("<think>", "</think>"),
           XmlCalls(section="<｜DSML｜", section_end_re="</｜DSML｜(?:function_calls|tool_calls)>",
                    function=r'(?:function_calls>|tool_calls>)?\s*<｜DSML｜invoke name="([^"]+)">', function_end="</｜DSML｜invoke>",
                    parameter=r'<｜DSML｜parameter name="([^"]+)"(?: string="(?:true|false)")?>',
                    parameter_end="</｜DSML｜parameter>", strip_values=False)),
    Family("minicpm", ("<think>", "</think>"),
           XmlCalls(function=r'<function name="([^"]+)">', function_end="</function>",
                    parameter=r'<param name="([^"]+)">', parameter_end="</param>", strip_values=False)),
    Family("kimi-k2", ("<think>", "</think>"),
           NamedCalls(section="<|tool_calls_section_begin|>", section_end="<|tool_calls_section_end|>",
                      call="<|tool_call_begin|>", name=r"\s*(?P<id>(?:functions\.)?(?P<name>[A-Za-z0-9_\-]+)(?::\d+)?)\s*"
                      r"<\|tool_call_argument_begin\|>", after_arguments=r"\s*<\|tool_call_end\|>")),
    Family("deepseek", ("<think>", "</think>"),
           NamedCalls(section="<｜tool▁calls▁begin｜>", section_end="<｜tool▁calls▁end｜>", call="<｜tool▁call▁begin｜>",
                      name=r"(?:function<｜tool▁sep｜>)?+(?P<name>[^<\n]+?)(?:<｜tool▁sep｜>|\n```(?:json)?\s*)",
                      after_arguments=r"\s*(?:```)?\s*<｜tool▁call▁end｜>")),
    Family("mistral-args", ("[THINK]", "[/THINK]"),
           NamedCalls(call="[TOOL_CALLS]", name=r"(?P<name>[A-Za-z0-9_.\-]+)(?:\[CALL_ID\](?P<id>[A-Za-z0-9]+))?\[ARGS\]")),
    Family("functionary-v3.1", (), NamedCalls(call="<function=", name=r"(?P<name>[A-Za-z0-9_.\-]+)>",
                                                after_arguments=r"\s*</function>")),
    Family("functionary-v3.2", (), NamedCalls(call=">>>", name=r"(?P<name>[A-Za-z0-9_.\-]+)\n", first_call_bare=True),
           lead=(">>>all\n", "all\n")),
    Family("gigachat", (), JsonCalls(openers=("<|message_sep|>\n\nfunction call<|role_sep|>", "<|function_call|>"))),
    Family("command-r7b", ("<|START_THINKING|>", "<|END_THINKING|>"),
           JsonCalls(openers=("<|START_ACTION|>",), closers=("<|END_ACTION|>",)),
           unwrap=("<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_TEXT|>", "<|END_TEXT|>")),
    Family("command-r-plus", (), JsonCalls(openers=("Action:\n```json",), closers=("```",)),
           unwrap=("<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")),
    Family("lfm2", ("<think>", "</think>"), PythonicCalls()),
    Family("apertus", ("<|inner_prefix|>", "<|inner_suffix|>"),
           JsonCalls(openers=("<|tools_prefix|>",), closers=("<|tools_suffix|>",))),
    Family("nemotron-v2", ("<think>", "</think>"), JsonCalls(openers=("<TOOLCALL>",), closers=("</TOOLCALL>",))),
    Family("apriel", ("", "[BEGIN FINAL RESPONSE]"),
           JsonCalls(openers=("<tool_calls>",), closers=("</tool_calls>",))),
    Family("firefunction", (), JsonCalls(openers=(" functools", "functools"))),
    Family("granite", ("<think>", "</think>"), JsonCalls(openers=("<|tool_call|>", "<tool_call>"),
                                                          closers=("</tool_call>",))),
    Family("mistral", ("[THINK]", "[/THINK]"), JsonCalls(openers=("[TOOL_CALLS]",), bare=True)),
    Family("llama3", (), JsonCalls(openers=("<|python_tag|>",), closers=("<|eom_id|>",), bare=True)),
    Family("hermes", ("<think>", "</think>"), JsonCalls(openers=("<tool_call>",), closers=("</tool_call>",),
                                                         bare=True)),
    # Any other template: the tools are described in the system prompt, and every common shape is read.
    Family("json", ("<think>", "</think>"),
           JsonCalls(openers=("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"),
                     closers=("</tool_call>", "<|eom_id|>"), bare=True)),
]}
# Names the model YAML has long accepted (`function.tool_format`).
FAMILIES["qwen3"] = FAMILIES["hermes"]
FAMILIES["deepseek-r1"] = FAMILIES["deepseek-v3.1"] = FAMILIES["deepseek"]

# Marker in the template -> family, most specific first.
_DETECT: list[tuple[tuple[str, ...], str]] = [
    (("<|channel|>", "<|message|>"), "gpt-oss"),
    (("to=self", "<|message|>"), "gpt-oss"),  # Muse's ATEM protocol: gpt-oss's, with to=self for thought
    (("<|tool_call>",), "gemma4"),
    (("]<]minimax[>[",), "minimax-m3"),
    (("<|open|>",), "kimi-k3"),
    (("<seed:tool_call>",), "seed-oss"),
    (("<minimax:tool_call>",), "minimax-m2"),
    (("｜DSML｜",), "deepseek-dsml"),
    (("<|tool_calls_section_begin|>",), "kimi-k2"),
    (("tool▁sep",), "deepseek"),
    (("<arg_key>",), "glm"),
    (("<parameter=",), "qwen3-coder"),
    (("<param name=",), "minicpm"),
    (("[ARGS]",), "mistral-args"),
    (("<|START_ACTION|>",), "command-r7b"),
    (("Action:",), "command-r-plus"),
    (("<|tool_call_start|>",), "lfm2"),
    (("List of tools",), "lfm2"),
    (("<|tools_prefix|>",), "apertus"),
    (("<TOOLCALL>",), "nemotron-v2"),
    (("[BEGIN FINAL RESPONSE]",), "apriel"),
    (("functools",), "firefunction"),
    ((">>>",), "functionary-v3.2"),
    (("<function=",), "functionary-v3.1"),
    (("<|function_call|>",), "gigachat"),
    (("<|tool_call|>",), "granite"),
    (("function call<|role_sep|>",), "gigachat"),
    (("'function call'", "role_sep"), "gigachat"),
    (("<tool_call>",), "hermes"),
    (("[TOOL_CALLS]",), "mistral"),
    (("<|python_tag|>",), "llama3"),
]
THINK_MARKERS = [("<seed:think>", "</seed:think>"), ("[THINK]", "[/THINK]"),
                 ("<|START_THINKING|>", "<|END_THINKING|>"), ("<|inner_prefix|>", "<|inner_suffix|>"),
                 ("<think>", "</think>")]


def family_of(template: str) -> str:
    """The output family a chat template teaches its model."""
    for markers, name in _DETECT:
        if all(m in template for m in markers):
            return name
    if "<|start_header_id|>" in template and "tools" in template:
        return "llama3"
    return "json"


def think_markers(template: str, family: str) -> tuple[str, ...]:
    """The thought markers of a family, or those the template uses when the family has none of its own."""
    own = FAMILIES[family].think
    if own and (own[0] in template or own[1] in template):
        return own
    for start, end in THINK_MARKERS:
        if end in template:
            return (start, end)
    return own


def thinking_open(prompt: str, think: tuple[str, ...]) -> str:
    """The opening thought marker the rendered prompt ends inside (its text from the marker on), or ""."""
    if not think or not think[0]:
        return ""
    at = prompt.rfind(think[0])
    if at < 0 or any(end in prompt[at:] for end in think[1:]) or prompt[at + len(think[0]):].strip():
        return ""
    return prompt[at:]


# -- parsing ------------------------------------------------------------------------------------------------


def parse(text: str, family: Family, options: Options, think: tuple[str, ...] = (), partial: bool = False) -> Parsed:
    """The model's thoughts, answer and calls in `text` (all of the output so far)."""
    if family.special is not None:
        return family.special(text, options, partial)
    think = think or family.think
    if family.noise:
        text = text.replace(family.noise, "")
        text = text[: len(text) - _held(text, [family.noise])]  # (one cut in half is noise too)
    result = Parsed()
    rest = text
    call_markers = family.calls.markers() if family.calls is not None and options.tools else []
    if think and think[1] and options.reasoning:
        opener, closers = think[0], think[1:]
        lead = rest.lstrip()
        inside = bool(options.thinking_open) or opener == ""
        if not inside and opener and lead.startswith(opener):
            inside, rest = True, lead[len(opener):]
        elif not inside and partial and opener and lead and opener.startswith(lead):
            return result  # the opening marker, cut in half
        elif not inside and any(lead.startswith(c) for c in closers):
            rest = lead[len(next(c for c in closers if lead.startswith(c))):]  # an empty thought, opener unsaid
        if inside:
            ends = [(i, m) for m in closers if (i := rest.find(m)) >= 0]
            if not ends and family.calls is not None and options.tools:  # a call ends a thought never closed
                begins = family.calls.find(rest, 0, True)
                if begins is not None and partial:
                    # A call written while thinking is thought if the thought closes later: wait to know.
                    result.reasoning = rest[:begins].strip()
                    return result
                if begins is not None:
                    ends.append((begins, ""))
            if ends:
                at, marker = min(ends)
                result.reasoning, rest = rest[:at].strip(), rest[at + len(marker):].lstrip()
            elif opener == "" and not options.thinking_open and not partial:
                pass  # a family whose thoughts need no opener (Apriel): without the closer it is all answer
            else:
                keep = _held(rest, list(closers) + call_markers) if partial else 0
                result.reasoning = rest[: len(rest) - keep].strip()
                return result
    elif not options.reasoning and options.thinking_open:
        rest = options.thinking_open + rest
    content, calls = _split_calls(rest, family, options, partial)
    if partial and family.unwrap:
        content = content[: len(content) - _held(content, list(family.unwrap))]
    for marker in family.unwrap:
        content = content.replace(marker, "")
    for lead in family.lead:
        if content.startswith(lead) or (partial and lead.startswith(content) and content):
            content = content[len(lead):]
    result.content, result.calls = content, calls
    return result


def _split_calls(text: str, family: Family, options: Options, partial: bool) -> tuple[str, list[Call]]:
    syntax = family.calls
    if syntax is None or not options.tools:
        return text, []
    content, calls, pos = "", [], 0
    while pos <= len(text):
        said = bool(content.strip())
        start = syntax.find(text, pos, said)
        if start is None:
            tail = text[pos:]
            keep = _held(tail, syntax.markers()) if partial else 0
            for marker in syntax.markers():
                at = tail.rfind(marker)
                if marker != "```" and at >= 0 and len(tail) - at < 64 and "\n\n" not in tail[at:]:
                    # An opener whose call is not readable yet: held back while generating, dropped when the
                    # output ends there (cut off by max_tokens).
                    keep = max(keep, len(tail) - at)
            if partial and not said and not tail.strip():
                keep = len(tail)  # blank so far: a bare call may follow
            return content + tail[: len(tail) - keep], calls
        read = syntax.read(text, start, options, partial)
        if read is None and not partial and any(text.startswith(m, start) for m in syntax.markers() if m != "```"):
            # The output ends inside a section its marker opened, where more text would have made a call (cut off
            # by max_tokens): the calls it had, and no markup in the answer.
            cut = syntax.read(text, start, options, True)
            if cut is not None and not cut[2]:
                read = cut
        if read is None:  # not a call after all: its first character is content, and reading goes on after it
            content += text[pos:start + 1]
            pos = start + 1
            continue
        found, end, complete = read
        if not complete and not partial:
            found = [c for c in found if c.name in options.tools]  # cut off at the end: the calls it had
        known = [c for c in found if c.name in options.tools or (not complete and c is found[-1] and c.name == "")]
        if len(known) < len(found):
            if not complete and partial and all(c.name in options.tools for c in found[:-1]):
                # the last call's name is not known yet (cut off): wait
                return content + text[pos:start], calls + found[:-1]
            content += text[pos:end if complete else len(text)]
            pos = end if complete else len(text) + 1
            if not complete:
                return content, calls
            continue
        if text[pos:start].strip() or (said and not calls):
            content += text[pos:start]  # (blanks before a first call, or between calls, go with them)
        for call in found:
            if len(calls) < MAX_PARALLEL_CALLS and (options.parallel or not calls):
                calls.append(call)
        if not complete:
            return content, calls
        pos = end
        if not text[pos:].strip():
            break
    return content, calls


# -- streaming ------------------------------------------------------------------------------------------------


@dataclass
class Delta:
    """What a stream step adds: text of the answer or of the thoughts, or a piece of a call (its first piece has
    its id and name)."""

    kind: str  # "content", "reasoning", "call"
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class OutputReader:
    """Turns the output as it grows into deltas that never take back what was given out.

    Each step re-reads the whole output (a partial parse) and gives out what is new: this keeps every format's
    reader a plain function of the text, at a cost linear in the output per step.
    """

    def __init__(self, family: Family, options: Options, think: tuple[str, ...] = ()) -> None:
        self.family, self.options, self.think = family, options, think
        self.text = ""
        self.content = ""
        self.reasoning = ""
        self.calls: list[Call] = []  # as given out: ids are the model's or Hearth's
        self._call_sources: list[str] = []  # the model's arguments text given out, per call

    def feed(self, text: str) -> list[Delta]:
        self.text += text
        return self._step(partial=True)

    def close(self) -> list[Delta]:
        return self._step(partial=False)

    def _step(self, partial: bool) -> list[Delta]:
        parsed = parse(self.text, self.family, self.options, self.think, partial)
        out: list[Delta] = []
        if parsed.reasoning.startswith(self.reasoning) and len(parsed.reasoning) > len(self.reasoning):
            out.append(Delta("reasoning", parsed.reasoning[len(self.reasoning):]))
            self.reasoning = parsed.reasoning
        content = parsed.content
        if not self.content and not content.strip() and partial:
            content = ""  # leading blank lines wait until something follows them
        if not self.content:
            content = content.lstrip("\n") if parsed.reasoning or self.reasoning else content
        if content.startswith(self.content) and len(content) > len(self.content):
            out.append(Delta("content", content[len(self.content):]))
            self.content = content
        for index, call in enumerate(parsed.calls):
            if not call.name:
                break
            if index >= len(self.calls):
                given = Call(call.name, "", call.id or new_call_id())
                self.calls.append(given)
                self._call_sources.append("")
                out.append(Delta("call", "", index, given.id, call.name))
            arguments = call.arguments
            if not partial and not arguments.strip():
                arguments = "{}"
            sent = self._call_sources[index]
            if arguments.startswith(sent) and len(arguments) > len(sent):
                out.append(Delta("call", arguments[len(sent):], index))
                self._call_sources[index] = arguments
                self.calls[index].arguments = arguments
        return out

    def reasoning_open(self) -> bool:
        """Whether the output so far ends inside a thought (for a thought budget to end it)."""
        think = self.think or self.family.think
        if len(think) < 2 or not think[1]:
            return False
        opened = bool(self.options.thinking_open) or (bool(think[0]) and self.text.lstrip().startswith(think[0]))
        return opened and not any(end in self.text for end in think[1:])

    def final(self) -> Parsed:
        """The whole output read once more as finished, with the ids its calls were given out with."""
        parsed = parse(self.text, self.family, self.options, self.think, partial=False)
        for index, call in enumerate(parsed.calls):
            call.id = self.calls[index].id if index < len(self.calls) else call.id or new_call_id()
            if not call.arguments.strip():
                call.arguments = "{}"
        return parsed
