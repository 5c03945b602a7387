"""The tool-call parser and the JSON-schema grammar converter, in-process (no model needed)."""

from __future__ import annotations

import json
import random

import pytest

from hearth.chat.calls import Options
from hearth.chat.families import FAMILIES, family_of
from hearth.chat.grammar import SchemaNotSupported, schema_grammar, strict_schema
from hearth.chat.output import OutputReader
from hearth.chat.serving import tool_arguments
from hearth.chat.tools import tool_call_grammar

NAMES = {"get_weather", "get_time"}
CASES = [
    ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Boston, MA"}}\n</tool_call>',
     "Sure.\n", [("get_weather", {"location": "Boston, MA"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Bo\\"s}ton"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "", [("get_weather", {"location": 'Bo"s}ton'}), ("get_time", {})]),
    ('  {"name": "get_weather", "parameters": {"location": "Paris"}}', "", [("get_weather", {"location": "Paris"})]),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "X"}}, '
     '{"name": "get_time", "arguments": {"tz": "UTC"}}]', "",
     [("get_weather", {"location": "X"}), ("get_time", {"tz": "UTC"})]),
    ('{"arguments": {"location": "Y"}, "name": "get_weather"}', "", [("get_weather", {"location": "Y"})]),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "location": "Boston"\n  }\n}\n```', "",
     [("get_weather", {"location": "Boston"})]),
    ("Use this:\n```python\nprint([1])\n```\nDone.", "Use this:\n```python\nprint([1])\n```\nDone.", []),
    ("The weather is nice today.", "The weather is nice today.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("I think a < b and [x] is fine", "I think a < b and [x] is fine", []),
    ('<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', []),
    ('Let me check.\n<tool_call>\n{"name": "nope", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {"zone": "NY"}}\n</tool_call>',
     'Let me check.\n<tool_call>\n{"name": "nope", "arguments": {"a": 1}}\n</tool_call>\n',
     [("get_time", {"zone": "NY"})]),
]


def parse(text: str, pieces: list[int], parallel: bool = True) -> tuple[str, list[tuple[str, str]]]:
    parser = OutputReader(FAMILIES["json"], Options(tools={name: {} for name in NAMES}, parallel=parallel))
    events, at = [], 0
    for n in pieces:
        events += parser.feed(text[at:at + n])
        at += n
    events += parser.feed(text[at:])
    events += parser.close()
    calls: dict[int, list[str]] = {}
    for event in events:
        if event.kind == "call":
            if event.name:
                assert event.index not in calls and event.id and event.id.startswith("call_")
                calls[event.index] = [event.name, ""]
            calls[event.index][1] += event.text
    return "".join(e.text for e in events if e.kind == "content"), [(n, a) for n, a in calls.values()]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parser_whole_and_in_any_pieces(text: str, content: str, calls: list) -> None:
    whole = parse(text, [])
    assert whole[0] == content
    assert [(name, json.loads(arguments)) for name, arguments in whole[1]] == calls
    for seed in range(40):
        rng = random.Random(seed)
        assert parse(text, [rng.randint(1, 7) for _ in range(len(text))]) == whole


def test_parser_one_call_when_not_parallel() -> None:
    content, calls = parse(CASES[1][0], [], parallel=False)
    assert [name for name, _ in calls] == ["get_weather"] and content == ""


def test_truncated_call_keeps_its_partial_arguments() -> None:
    content, calls = parse('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Bos', [5, 9, 3])
    assert content == "" and calls == [("get_weather", '{"location": "Bos')]


def test_format_detection() -> None:
    assert family_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert family_of("[AVAILABLE_TOOLS] [TOOL_CALLS]") == "mistral"
    assert family_of("<|start_header_id|>{% if tools %}<|python_tag|>") == "llama3"
    assert family_of("<|im_start|>{{ message.content }}") == "json"


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "integer", "minimum": 1}, "minimum"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"if": {}, "then": {}}, "if"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date", "maxLength": 3}}}, "maxLength"),
])
def test_unsupported_schema_keywords_are_named(schema: dict, keyword: str) -> None:
    with pytest.raises(SchemaNotSupported) as caught:
        schema_grammar(schema)
    assert caught.value.keyword == keyword and keyword in str(caught.value)


def test_grammars_are_well_formed() -> None:
    schema = {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "type": "object",
        "title": "Thing",
        "properties": {"p": {"$ref": "#/$defs/Point"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                "maxItems": 3},
                       "when": {"type": "string", "format": "date-time"}, "maybe": {"type": ["string", "null"]},
                       "child": {"$ref": "#"}},
        "required": ["p"],
    }
    grammar = schema_grammar(schema)
    lines = grammar.strip().splitlines()
    assert lines[0].startswith("root ::= ")
    names = [line.split(" ::= ")[0] for line in lines]
    assert len(names) == len(set(names)), "every rule is defined once"
    referenced = {word.rstrip("*+?") for line in lines for word in line.split(" ::= ")[1].split()
                  if word[0].isalpha()}
    assert referenced <= set(names), f"undefined rules: {referenced - set(names)}"
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    hermes = tool_call_grammar("hermes", tools, parallel=True)
    assert hermes.startswith('root ::= tagged-call ( "\\n" tagged-call ){0,7}')
    assert '"\\"get_weather\\""' in hermes


def test_strict_schema_closes_objects_but_not_property_names() -> None:
    schema = {"type": "object", "properties": {"properties": {"type": "string"},
                                               "inner": {"type": "object", "properties": {"a": {"type": "integer"}}}},
              "$defs": {"D": {"properties": {"b": {}}}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["inner"]["additionalProperties"] is False
    assert strict["$defs"]["D"]["additionalProperties"] is False
    assert strict["properties"]["properties"] == {"type": "string"}
    assert schema_grammar(strict)


def test_arguments_mapping_never_raises() -> None:
    assert tool_arguments('{"city": "Boston"}') == {"city": "Boston"}
    assert tool_arguments("") == {}
    assert tool_arguments('{"city": "Bos') == {}  # cut off by max_tokens mid-call
    assert tool_arguments('["a"]') == {}
