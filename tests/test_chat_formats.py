"""llama.cpp's chat-parser cases (tests/data/llama-chat/cases.json, ported by scripts/port_test_chat.py) run
through Hearth's output reader, streamed a character at a time as llama.cpp's own test does; and every vendored
template rendered for a conversation with tools, a call, its result and a prior turn's thoughts."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from hearth.chat.calls import Options
from hearth.chat.families import FAMILIES, family_of, markup, think_markers, thinking_open
from hearth.chat.output import OutputReader, parse
from hearth.chat.request import ChatRequest
from hearth.chat.serving import Plan, template_messages
from hearth.chat.template import render_chat
from hearth.chat.tools import template_takes_tools
from hearth.errors import InvalidRequest

DATA = Path(__file__).parent / "data" / "llama-chat"
PASS_RATE = 0.90
# Cases Hearth reads differently from llama.cpp, with why (README "Reasoning and tool-call formats").
KNOWN = json.loads((DATA / "known-failures.json").read_text())


@cache
def template(name: str) -> str:
    return (DATA / "templates" / name).read_text()


def reading(case: dict) -> tuple[str, Options, tuple[str, ...]]:
    """The case's family, reading options and thought markers, as a request for it would have them."""
    source = template(case["template"])
    options = case["options"]
    tools = options.get("tools") or []
    family = family_of(source)
    think = think_markers(source, family)
    try:  # the prompt tells whether the output starts inside a thought
        prompt = render_chat(source, [{"role": "user", "content": "Hey there!"}],
                             tools=[{"type": "function", "function": t} for t in tools] or None,
                             add_generation_prompt=options.get("add_generation_prompt", True),
                             enable_thinking=options.get("enable_thinking", True))
    except InvalidRequest:
        prompt = ""  # (Functionary v3.2's template wants its own `functions` variable with tools)
    return family, Options(
        tools={t["name"]: t["parameters"] for t in tools}, parallel=options.get("parallel_tool_calls", False),
        reasoning=options.get("reasoning_format", "none") != "none", thinking_open=thinking_open(prompt, think)), think


def read(case: dict) -> dict:
    family, options, think = reading(case)
    reader = OutputReader(FAMILIES[family], options, think)
    deltas = [d for ch in case["input"] for d in reader.feed(ch)]
    if not case["partial"]:
        deltas += reader.close()
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta.kind == "call":
            if delta.name:
                calls[delta.index] = {"name": delta.name, "arguments": "", "id": delta.id}
            calls[delta.index]["arguments"] += delta.text
    return {"content": "".join(d.text for d in deltas if d.kind == "content"),
            "reasoning": "".join(d.text for d in deltas if d.kind == "reasoning"), "tool_calls": list(calls.values())}


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None  # partial arguments: compared as llama.cpp does, not at all


def agrees(expected: dict, got: dict) -> bool:
    """llama.cpp's comparison: content and thoughts with outer blanks stripped, arguments as JSON values; an id only
    where the model wrote one (Hearth gives every call an id, as OpenAI's API does)."""
    if got["content"].strip() != expected["content"].strip() or \
            got["reasoning"].strip() != expected["reasoning"].strip():
        return False
    if len(got["tool_calls"]) != len(expected["tool_calls"]):
        return False
    for want, have in zip(expected["tool_calls"], got["tool_calls"], strict=True):
        if want["name"] != have["name"] or _json(want["arguments"]) != _json(have["arguments"]):
            return False
        if want["id"] and want["id"] != have["id"]:
            return False
    return True


def key(case: dict) -> str:
    return f"{case['template']}: {case['input'][:60]!r}"


def test_ported_llama_cpp_cases() -> None:
    cases = json.loads((DATA / "cases.json").read_text())["cases"]
    failing = sorted({key(c) for c in cases if not agrees(c["expect"], read(c))})
    rate = 1 - len(failing) / len(cases)
    assert rate >= PASS_RATE, f"{rate:.1%} of {len(cases)} pass"
    assert set(failing) <= set(KNOWN), f"newly failing: {sorted(set(failing) - set(KNOWN))}"


def test_an_output_cut_off_anywhere_leaves_no_call_markup_in_the_answer() -> None:
    """As max_tokens cuts a reply: every prefix of every case with calls, read as finished."""
    cases = json.loads((DATA / "cases.json").read_text())["cases"]
    for case in cases:
        if not case["expect"]["tool_calls"] or key(case) in KNOWN:
            continue
        family, options, think = reading(case)
        markers = markup(FAMILIES[family])
        for n in range(1, len(case["input"])):
            content = parse(case["input"][:n], FAMILIES[family], options, think).content
            assert not any(m in content for m in markers), (key(case), case["input"][:n], content)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What time is it in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "The user wants the time; I should call get_time.",
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time",
                                                                        "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "14:05"},
    {"role": "assistant", "content": "It is 14:05.", "reasoning_content": "The tool answered."},
    {"role": "user", "content": "Thanks!"},
]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                                    "description": "A city"}},
                                                          "required": ["city"]}}}]


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "templates").glob("*.jinja")))
def test_every_vendored_template_renders(name: str) -> None:
    """As a chat request renders it: a template without tools gets the calls and results spelled out."""
    source = template(name)
    native = template_takes_tools(source)
    request = ChatRequest(model="m", messages=CONVERSATION, tools=[t["function"] for t in TOOLS])
    plan = Plan(tools=request.tools, mode="auto", family=family_of(source))
    prompt = render_chat(source, template_messages(request, plan, native), tools=TOOLS if native else None,
                         bos_token="<s>", eos_token="</s>", enable_thinking=True)
    assert "Paris" in prompt and "14:05" in prompt
