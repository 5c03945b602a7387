"""Tool calling: how tools are described to a model whose template has none, and the grammar that forces a call in
the JSON-object formats (reading calls back is `chat.output`).

Formats, chosen from the chat template or set in the model YAML (`function: {tool_format: ...}`):

- `hermes` (Qwen 2.5, Hermes, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- `llama3`: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
- `json` (any other model; the tools are described in the system prompt): `{"name": ..., "arguments": {...}}`,
  or a list of them

Calls in other families' formats (Qwen3-Coder's XML, DeepSeek's tokens, gpt-oss's channels, …) are read by
`chat.output` but not forced by a grammar.
"""

from __future__ import annotations

import json
import re
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


def template_takes_tools(template: str) -> bool:
    """Whether the template renders a `tools` list itself (else Hearth describes the tools in the system prompt)."""
    return re.search(r"\btools\b", template) is not None


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
