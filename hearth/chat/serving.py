"""Chat, once for every API: a `ChatRequest` in, typed events out.

Here the template is rendered (with the tools, the thinking switches and the client's template kwargs), tools,
`response_format` and LocalAI's `grammar` become one GBNF grammar (enforced by llama.cpp's sampler in the runner,
after the thoughts, never on them), the reasoning budget is kept, and the model's text is read back into answer,
thoughts and tool calls as it streams (`chat.output`).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hearth.chat.calls import Options
from hearth.chat.families import FAMILIES, family_of, think_markers, thinking_open
from hearth.chat.grammar import GrammarBuilder, SchemaNotSupported, literal, strict_schema
from hearth.chat.images import ImagePolicy, load_image
from hearth.chat.output import OutputReader
from hearth.chat.request import (
    REASONING_EFFORTS,
    ChatEvent,
    ChatRequest,
    Finished,
    Message,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStarted,
    Usage,
)
from hearth.chat.template import arguments_object, render_chat
from hearth.chat.tools import (
    call_text,
    lazy_triggers,
    system_prompt_for,
    template_takes_tools,
    tool_call_grammar,
)
from hearth.config.schema import ModelConfig
from hearth.engine import Engine
from hearth.errors import CapabilityNotSupported, InvalidRequest
from hearth.generation import merge, sampling_params, stop_list, timings_dict, with_seed
from hearth.runner import hearth_pb2 as pb

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ALWAYS_ALLOWED_KWARGS = ("enable_thinking", "reasoning_effort", "thinking")
# The legacy JSON-call formats' grammar (tool_call_grammar) per output family.
GRAMMAR_FORMATS = {"hermes": "hermes", "llama3": "llama3", "mistral": "mistral"}


@dataclass
class Plan:
    """What a request asks of the model, worked out (and checked) before a runner is involved."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "none"  # none, auto, required, or named
    forced: str | None = None
    parallel: bool = True
    family: str = "json"
    think: tuple[str, ...] = ()
    grammar: str = ""
    answer_grammar: str = ""  # the grammar without the thoughts before it (once thinking has been ended)
    lazy: bool = False
    thinking: bool = True  # the model may think (not turned off by reasoning_effort none or a budget of 0)
    budget: int | None = None  # thought tokens before the end of thinking is forced (None: no limit)
    split: bool = True  # thoughts are read out of the answer


def _plan(request: ChatRequest, config: ModelConfig, template: str) -> Plan:
    plan = Plan(tools=list(request.tools))
    names = [t["name"] for t in plan.tools]
    for index, name in enumerate(names):
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise InvalidRequest(f"function name '{name}' must be 1-64 letters, digits, '_' or '-'",
                                 param=request.param(f"tools[{index}].function.name"))
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param=request.param("tools"))
    param = request.param("tool_choice")
    choice = request.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise InvalidRequest(f"{param} must be 'none', 'auto', 'required' or "
                                 '{"type": "function", "function": {"name": ...}}', param=param)
        if name not in names:
            raise InvalidRequest(f"{param} names function '{name}', which is not among the tools", param=param)
        plan.mode, plan.forced = "named", name
    elif choice is not None and choice not in (("none", "auto") if request.legacy_functions else
                                               ("none", "auto", "required")):
        raise InvalidRequest(f"{param} '{choice}' is not one of " +
                             ("'none', 'auto' or {\"name\": ...}" if request.legacy_functions else
                              "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"),
                             param=param)
    else:
        plan.mode = choice or ("auto" if plan.tools else "none")
    if plan.mode != "none" and not plan.tools:
        if plan.mode == "auto":
            plan.mode = "none"
        else:
            raise InvalidRequest(f"{param} '{plan.mode}' needs tools to choose from", param=param)
    plan.parallel = request.parallel_tool_calls is not False and not request.legacy_functions and \
        plan.mode != "named"
    plan.family = config.function.tool_format or family_of(template)
    if plan.family not in FAMILIES:
        plan.family = "json"
    plan.think = think_markers(template, plan.family)
    reasoning = request.reasoning
    if reasoning.effort is not None and reasoning.effort not in REASONING_EFFORTS:
        raise InvalidRequest(f"reasoning_effort '{reasoning.effort}' is not one of {', '.join(REASONING_EFFORTS)}",
                             param=request.param("reasoning_effort"))
    plan.budget = reasoning.budget if reasoning.budget is not None else config.reasoning.budget
    if plan.budget is not None and plan.budget < 0:
        plan.budget = None  # -1: no limit, whatever the YAML says
    plan.thinking = reasoning.effort != "none" and plan.budget != 0
    plan.split = reasoning.split if reasoning.split is not None else config.reasoning.format != "none"
    return plan


def _grammar(request: ChatRequest, config: ModelConfig, plan: Plan) -> str:
    """The one grammar this request's answer must follow (empty for free text)."""
    builder = GrammarBuilder()
    content_rule = None
    response_format = request.response_format
    where = request.param("response_format")
    if response_format is not None and response_format.get("type") != "text":
        if request.grammar:
            raise InvalidRequest("send either grammar or response_format, not both", param=request.param("grammar"))
        if response_format.get("type") == "json_object":
            content_rule = builder.primitive("object")
        else:
            schema_format = response_format.get("json_schema")
            if not isinstance(schema_format, dict):
                raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' object",
                                     param=f"{where}.json_schema")
            schema = schema_format.get("schema")
            schema = schema if schema is not None else {"type": "object"}
            try:
                content_rule = builder.schema(strict_schema(schema) if schema_format.get("strict") else schema,
                                              "response")
            except SchemaNotSupported as exc:
                raise InvalidRequest(str(exc), param=f"{where}.json_schema.schema") from None
    if config.function.grammar.disable:
        return request.grammar or (builder.render(content_rule) if content_rule is not None else "")
    fmt = GRAMMAR_FORMATS.get(plan.family)
    forced = plan.mode in ("required", "named")
    if (forced or plan.mode == "auto") and fmt is None and plan.family != "json":
        # A format whose calls are not JSON objects: its calls are read, not forced by a grammar.
        if forced:
            raise InvalidRequest(f"tool_choice '{plan.mode}' cannot be enforced for this model's call format "
                                 f"({plan.family}); use 'auto'", param=request.param("tool_choice"))
        return builder.render(content_rule) if content_rule is not None else ""
    if forced or plan.mode == "auto":
        if request.grammar:
            raise InvalidRequest("a grammar cannot be combined with tools", param=request.param("grammar"))
        param = request.param("tools")
        for index, tool in enumerate(plan.tools):  # check each alone, so the error can say which one
            try:
                GrammarBuilder().schema(tool.get("parameters") or {"type": "object"}, "arguments")
            except SchemaNotSupported as exc:
                if plan.mode == "auto" and content_rule is None:
                    return ""  # calls are still parsed; only forced calls must be constrained
                raise InvalidRequest(f"function '{tool['name']}': {exc}",
                                     param=f"{param}[{index}].function.parameters") from None
        tools = [t for t in plan.tools if plan.forced in (None, t["name"])]
        plan.lazy = plan.mode == "auto" and content_rule is None
        key = config.function.function_arguments_key
        return tool_call_grammar(fmt or "json", tools, plan.parallel,
                                 content_rule=content_rule if plan.mode == "auto" else None, builder=builder,
                                 name_key=config.function.function_name_key,
                                 arguments_key=None if key == "arguments" else key, lazy=plan.lazy)
    if content_rule is not None:
        return builder.render(content_rule)
    return request.grammar or ""


def _excluding(marker: str) -> str:
    """GBNF for any text that does not contain `marker`."""
    def char_class(ch: str) -> str:
        return "[^" + ("\\" + ch if ch in "]^-\\" else ch) + "]"

    alternatives = [f"{literal(marker[:i]) + ' ' if i else ''}{char_class(marker[i])}" for i in range(len(marker))]
    return "( " + " | ".join(alternatives) + " )*"


def thoughts_first(grammar: str, think: tuple[str, ...], open_marker: str) -> str:
    """A grammar for the answer, made to let the model think first: inside an open thought the grammar starts
    from the thought's text and its end marker; otherwise a whole thought may open the output."""
    if not grammar or not think or not think[0] or not think[1]:
        return grammar
    body = grammar.replace("root ::=", "answer ::=", 1)
    thought = f"{_excluding(think[1])} {literal(think[1])} [ \\t\\n]*"
    if open_marker:
        return f"root ::= {thought} answer\n{body}"
    return f"root ::= ( {literal(think[0])} {thought} )? answer\n{body}"


def template_messages(request: ChatRequest, plan: Plan, native: bool) -> list[dict[str, Any]]:
    """The conversation as the template gets it; calls and results are spelled out when it has no tool support."""
    messages = []
    names_by_id: dict[str, str] = {}
    for message in request.messages:
        item = {k: v for k, v in message.items() if v is not None}
        if item["role"] == "developer":
            item["role"] = "system"  # OpenAI's newer name; chat templates know "system"
        if item["role"] == "function":
            item["role"] = "tool"
        if "reasoning" in item and "reasoning_content" not in item:
            item["reasoning_content"] = item.pop("reasoning")  # vLLM's and Ollama's name for a turn's thoughts
        if item.get("reasoning_content"):
            item.setdefault("thinking", item["reasoning_content"])  # gpt-oss's templates read `thinking`
        for call in item.get("tool_calls", []):
            names_by_id[call.get("id", "")] = call["function"]["name"]
        if not native:
            if item.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}
                         for c in item.pop("tool_calls")]
                text = item.get("content") if isinstance(item.get("content"), str) else ""
                item["content"] = "\n".join(x for x in (text, call_text(GRAMMAR_FORMATS.get(plan.family, "json"),
                                                                        calls)) if x)
            if item["role"] == "tool":
                name = item.get("name") or names_by_id.get(item.get("tool_call_id", ""), "the function")
                content = item.get("content")
                text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
                item = {"role": "user", "content": f"Result of {name}: {text}"}
        messages.append(item)
    if plan.mode != "none" and not native:
        instructions = system_prompt_for(plan.tools, plan.parallel)
        if messages and messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + instructions}
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages


def template_kwargs(request: ChatRequest, config: ModelConfig, plan: Plan) -> dict[str, Any]:
    """What the template is told beyond the messages: the thinking switches, and the client's allowed kwargs."""
    allowed = set(ALWAYS_ALLOWED_KWARGS) | set(config.reasoning.template_kwargs)
    for name in request.template_kwargs:
        if name not in allowed:
            raise InvalidRequest(f"chat_template_kwargs '{name}' is not allowed for this model; allowed: "
                                 f"{', '.join(sorted(allowed))} (the model YAML's reasoning.template_kwargs adds more)",
                                 param=request.param("chat_template_kwargs"))
    kwargs: dict[str, Any] = {"enable_thinking": plan.thinking}
    effort = request.reasoning.effort
    if effort not in (None, "none"):
        kwargs["reasoning_effort"] = "low" if effort == "minimal" else effort  # gpt-oss knows low, medium, high
    kwargs.update(request.template_kwargs)
    if "enable_thinking" in request.template_kwargs:
        plan.thinking = bool(request.template_kwargs["enable_thinking"])
    return kwargs


def _image_urls(request: ChatRequest) -> list[tuple[str, str]]:
    """(url, param) of every image part, in conversation order."""
    found = []
    for index, message in enumerate(request.messages):
        if isinstance(message.get("content"), list):
            for number, part in enumerate(message["content"]):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    found.append((part["image_url"]["url"],
                                  request.param(f"messages[{index}].content[{number}].image_url.url")))
    return found


async def _images(request: ChatRequest, engine: Engine, capabilities: list[str]) -> list[bytes]:
    """The request's images, loaded before the runner sees anything; a 400 if the model takes none."""
    urls = _image_urls(request)
    if not urls:
        return []
    if "vision" not in capabilities:
        takes = sorted(c.name for c in engine.registry.models() if "vision" in c.usecases)
        where = (f"; installed models that do: {', '.join(takes)}" if takes else
                 "; no installed model takes images (a vision-language model is needed)")
        raise CapabilityNotSupported(f"model '{request.model}' does not accept images{where}",
                                     param=request.param("messages"))
    policy = ImagePolicy.from_settings(engine.settings)
    return list(await asyncio.gather(*(load_image(url, policy, param) for url, param in urls)))


@dataclass
class Prepared:
    prompt: str
    plan: Plan
    images: list[bytes]
    open_marker: str  # the prompt ends inside a thought: the marker that opened it


async def prepare(request: ChatRequest, engine: Engine, config: ModelConfig, runner: Any) -> Prepared:
    """The rendered prompt, the plan (tools, format, grammar) and the loaded images, for a ready runner."""
    info = runner.info
    assert info is not None
    template = config.template.chat or info.chat_template
    if not template:
        raise CapabilityNotSupported(
            f"model '{request.model}' has no chat template, so it cannot chat; use /v1/completions with a "
            f"prompt, or set template.chat (Jinja) in its YAML ({config.source_file})", param="model")
    plan = _plan(request, config, template)
    images = await _images(request, engine, list(info.capabilities))
    native = template_takes_tools(template)
    tools = [{"type": "function", "function": t} for t in plan.tools] if native and plan.mode != "none" else None
    kwargs = template_kwargs(request, config, plan)
    prompt = render_chat(template, template_messages(request, plan, native), bos_token=info.bos_token,
                         eos_token=info.eos_token, strip_bos=info.add_bos, tools=tools,
                         keep_parts="vision" in info.capabilities,
                         media_marker=info.metadata.get("media_marker", "") if images else "", **kwargs)
    open_marker = thinking_open(prompt, plan.think)
    if open_marker and not plan.thinking:
        # The template could not turn thinking off: end the thought before it begins.
        prompt += plan.think[1] + "\n\n"
        open_marker = ""
    try:
        plan.grammar = _grammar(request, config, plan)
    except RecursionError:
        param = "response_format" if request.response_format is not None else "tools"
        raise InvalidRequest("the JSON schema is nested too deeply to build a grammar from it",
                             param=request.param(param)) from None
    # A model whose template writes thoughts may think before its constrained answer; others answer at once.
    plan.answer_grammar = plan.grammar
    if plan.grammar and plan.thinking and not plan.lazy and plan.think and plan.think[1] in template:
        plan.grammar = thoughts_first(plan.grammar, plan.think, open_marker)
    return Prepared(prompt, plan, images, open_marker)


async def count_prompt_tokens(request: ChatRequest, engine: Engine) -> int:
    """How many tokens the chat request's prompt is, as the model reads it (template and tools included)."""
    config = engine.model(request.model)
    async with engine.runner(config, "generate") as runner:
        prompt = (await prepare(request, engine, config, runner)).prompt
        tokens = await runner.call("tokenize", prompt, add_special=True, parse_special=True)
    return len(tokens)


def _logprobs(entries: Any) -> list[dict[str, Any]]:
    return [{"token": e.text, "logprob": e.logprob, "bytes": list(e.bytes),
             "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top]}
            for e in entries]


def _usage(usage: pb.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 cached_tokens=usage.cached_tokens)


async def chat_events(request: ChatRequest, engine: Engine) -> AsyncIterator[ChatEvent]:
    """The chat as typed events, every choice's interleaved; the first arrives once generation has begun."""
    config = engine.model(request.model)
    stops = stop_list(request, config)
    sampling = sampling_params(request, config)
    max_tokens = request.max_tokens or config.parameters.max_tokens or 0
    request_id = request.request_id or f"chat-{uuid.uuid4().hex[:24]}"
    # Of several replicas, a conversation goes back to the one whose prompt cache holds its earlier turns.
    affinity = [json.dumps(m, sort_keys=True) for m in request.messages] if config.replicated else None

    async with engine.runner(config, "generate", affinity) as runner:
        ready = await prepare(request, engine, config, runner)
        plan = ready.plan
        sampling.grammar = plan.grammar
        if plan.lazy:
            sampling.grammar_triggers.extend(lazy_triggers(GRAMMAR_FORMATS.get(plan.family, "json"),
                                                           [t["name"] for t in plan.tools],
                                                           config.function.function_name_key))
        if plan.grammar and request.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a grammar, tools or response_format",
                                 param=request.param("ignore_eos"))
        budget = plan.budget
        reading = Options(tools={t["name"]: t.get("parameters") or {} for t in plan.tools} if plan.mode != "none"
                          else {}, parallel=plan.parallel, reasoning=plan.split, thinking_open=ready.open_marker)

        async def choice(index: int) -> AsyncIterator[ChatEvent]:
            reader = OutputReader(FAMILIES[plan.family], reading, plan.think)
            usage, text, thought_tokens = Usage(), "", 0
            logprobs: list[dict[str, Any]] = []
            prompt, limit, forced_end = ready.prompt, max_tokens, False
            started = False
            reply: Any = None
            while True:
                # A budget splits generation in two passes: the thoughts, stopped at their end marker or at the
                # budget (a thought still open then is ended by writing its end marker after it), then the answer,
                # under the answer's own grammar, the prompt cache keeping the second pass cheap. (With a grammar,
                # only where the prompt opened the thought: an answer's grammar cannot be picked up halfway.)
                budgeted = budget is not None and budget > 0 and not forced_end and plan.thinking and \
                    len(plan.think) > 1 and bool(plan.think[1]) and (bool(ready.open_marker) or not plan.grammar)
                this_limit = min(x for x in (budget, limit) if x) if budgeted else limit
                this_stops = [*stops, plan.think[1]] if budgeted else stops
                params = with_seed(sampling, index)
                if forced_end and plan.answer_grammar != params.grammar:
                    params = pb.SamplingParams()
                    params.CopyFrom(with_seed(sampling, index))
                    params.grammar = plan.answer_grammar
                    del params.grammar_triggers[:]
                generate = pb.GenerateRequest(
                    prompt=prompt + text, parse_special=True, add_special=True, max_tokens=this_limit or 0,
                    stop=this_stops, sampling=params, request_id=request_id,
                    ignore_eos=request.ignore_eos, logprobs=request.logprobs, top_logprobs=request.top_logprobs or 0,
                    images=ready.images)
                async for reply in runner.generate(generate):
                    if not started:
                        started = True
                        early = reply.HasField("usage") and not reply.finish_reason
                        yield Started(index, _usage(reply.usage) if early else None)
                    entries = _logprobs(reply.logprobs) if request.logprobs and reply.logprobs else None
                    if entries:
                        logprobs.extend(entries)
                    said_text = False
                    if reply.text:
                        text += reply.text
                        thought_chars = answer_chars = 0
                        for delta in reader.feed(reply.text):
                            for event in _event(index, delta, entries if not said_text else None):
                                said_text = said_text or isinstance(event, TextDelta)
                                if isinstance(event, ReasoningDelta):
                                    thought_chars += len(event.text)
                                elif isinstance(event, TextDelta | ToolArgumentsDelta):
                                    answer_chars += len(event.text)
                                yield event
                        # The reply's tokens are thought in the share of its text that was (text held back inside
                        # an open thought counts as thought).
                        tokens = reply.token_count or 1
                        if thought_chars + answer_chars:
                            thought_tokens += round(tokens * thought_chars / (thought_chars + answer_chars))
                        elif reader.reasoning_open():
                            thought_tokens += tokens
                    if entries and not said_text:
                        yield TextDelta(index, "", entries)
                    if reply.finish_reason:
                        usage.add(_usage(reply.usage) if not usage.prompt_tokens else
                                  Usage(completion_tokens=reply.usage.completion_tokens))
                thought_ended = reply is not None and reply.stop_sequence == plan.think[1] if budgeted else False
                if budgeted and reply is not None and (thought_ended or reply.finish_reason == "length") and \
                        (not limit or usage.completion_tokens < limit):
                    forced_end = True
                    if reader.reasoning_open():
                        closing = plan.think[1] + "\n\n"
                        text += closing
                        for delta in reader.feed(closing):
                            for event in _event(index, delta, None):
                                yield event
                    if limit:
                        limit -= usage.completion_tokens
                    continue
                break
            finish = reply.finish_reason if reply is not None else "stop"
            for delta in reader.close():
                for event in _event(index, delta, None):
                    yield event
            if reader.calls and finish == "stop":
                finish = "tool_calls"
            usage.reasoning_tokens = min(thought_tokens, usage.completion_tokens)
            if index:
                usage.prompt_tokens = usage.cached_tokens = 0  # the prompt is counted once, with the first choice
            final = reader.final()
            message = Message(content=final.content, reasoning=final.reasoning, logprobs=logprobs,
                              tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in final.calls])
            yield Finished(index, finish, usage, timings_dict(reply.timings) if reply is not None else {},
                           reply.stop_sequence if reply is not None else "", message)

        if request.n == 1:
            async for event in choice(0):
                yield event
        else:
            async for event in merge([choice(i) for i in range(request.n)]):
                yield event


def _event(index: int, delta: Any, logprobs: list[dict[str, Any]] | None) -> list[ChatEvent]:
    if delta.kind == "content":
        return [TextDelta(index, delta.text, logprobs)]
    if delta.kind == "reasoning":
        return [ReasoningDelta(index, delta.text)]
    if delta.name:
        started: list[ChatEvent] = [ToolCallStarted(index, delta.index, delta.id, delta.name)]
        return started + ([ToolArgumentsDelta(index, delta.index, delta.text)] if delta.text else [])
    return [ToolArgumentsDelta(index, delta.index, delta.text)]


def tool_arguments(text: str) -> dict[str, Any]:
    """A call's arguments as the object APIs that take them parsed want (Ollama, Anthropic); arguments that are
    not a JSON object (a reply cut off by max_tokens mid-call) become an empty object rather than an error."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
