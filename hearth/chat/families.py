"""Model families' output formats: their thought markers and call syntax, chosen from a chat template.

The families and their markers are facts from llama.cpp's chat parser tests (tests/data/llama-chat/cases.json);
`family_of(template)` picks one by the markers the template writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hearth.chat.calls import (
    Call,
    CallSyntax,
    GemmaCalls,
    JsonCalls,
    NamedCalls,
    Options,
    Parsed,
    PythonicCalls,
    XmlCalls,
    held,
)


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
            piece = piece[: len(piece) - held(piece, ["<|end|>", "<|call|>", "<|return|>", "<|start|>assistant",
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
