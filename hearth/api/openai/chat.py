"""POST /v1/chat/completions: request model, serving logic, route.

Every OpenAI chat parameter is honoured or refused with a 400 naming it. Tools, `response_format` and LocalAI's
`grammar` become one GBNF grammar (built here, enforced by llama.cpp's sampler in the runner); the model's text
is parsed back into `tool_calls` as it streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.api.images import ImagePolicy, load_image
from hearth.api.openai.common import (
    INT32_MAX,
    PROMPT_KEY,
    STOP_KEY,
    USAGE_KEY,
    SamplingRequest,
    chat_logprobs,
    merge,
    new_id,
    now,
    only_completion,
    refuse_unsupported,
    respond,
    sampling_params,
    stop_list,
    timings_dict,
    total_usage,
    with_seed,
)
from hearth.chat.grammar import GrammarBuilder, SchemaNotSupported, strict_schema
from hearth.chat.template import arguments_object, render_chat
from hearth.chat.tools import (
    ToolCallDelta,
    ToolCallParser,
    call_text,
    detect_format,
    lazy_triggers,
    system_prompt_for,
    template_takes_tools,
    tool_call_grammar,
)
from hearth.config.schema import ModelConfig
from hearth.engine import Engine
from hearth.errors import CapabilityNotSupported, InvalidRequest
from hearth.runner import hearth_pb2 as pb

MAX_TOOLS = 128
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageUrl


class AudioPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Accepted because they change nothing about the answer: hints and bookkeeping.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused with a clear message when set to something Hearth cannot do.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None


@dataclass
class Plan:
    """What a request asks of the model, worked out (and checked) before a runner is involved."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # function definitions offered to the model
    mode: str = "none"  # none, auto, required, or named
    forced: str | None = None  # the function tool_choice names
    parallel: bool = True
    legacy: bool = False  # the request used functions/function_call: answer with function_call
    fmt: str = "json"
    grammar: str = ""
    lazy: bool = False  # the grammar holds only once a call begins


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    refuse_unsupported(request)
    if request.store:
        raise InvalidRequest("Hearth does not store completions; leave store unset or false", param="store")
    if request.modalities and any(m != "text" for m in request.modalities):
        raise InvalidRequest("only the 'text' output modality is supported", param="modalities")
    for name in ("audio", "reasoning_effort", "web_search_options", "verbosity"):
        if getattr(request, name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this model", param=name)
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.tools is not None and request.functions is not None:
        raise InvalidRequest("send either tools or the deprecated functions, not both", param="functions")
    if request.function_call is not None and request.tool_choice is not None:
        raise InvalidRequest("send either tool_choice or the deprecated function_call, not both",
                             param="function_call")
    for index, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, AudioPart | FilePart):
                    kind = "audio" if isinstance(part, AudioPart) else "files"
                    raise CapabilityNotSupported(
                        f"model '{request.model}' does not accept {kind} in chat; text and images are supported",
                        param=f"messages[{index}].content")
                if isinstance(part, ImagePart) and message.role != "user":
                    raise InvalidRequest("images are only allowed in user messages",
                                         param=f"messages[{index}].content")
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(f"messages[{index}] has role 'tool' but no tool_call_id",
                                 param=f"messages[{index}].tool_call_id")


def _plan(request: ChatCompletionRequest, config: ModelConfig, template: str) -> Plan:
    plan = Plan()
    if request.functions is not None:
        plan.legacy = True
        plan.tools = [f.model_dump(exclude_none=True) for f in request.functions]
        choice: Any = request.function_call
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
    else:
        plan.tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
        choice = request.tool_choice
    names = [t["name"] for t in plan.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param="tools")
    param = "function_call" if plan.legacy else "tool_choice"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise InvalidRequest(f"{param} must be 'none', 'auto', 'required' or "
                                 '{"type": "function", "function": {"name": ...}}', param=param)
        if name not in names:
            raise InvalidRequest(f"{param} names function '{name}', which is not among the tools", param=param)
        plan.mode, plan.forced = "named", name
    elif choice is not None and choice not in (("none", "auto") if plan.legacy else ("none", "auto", "required")):
        raise InvalidRequest(f"{param} '{choice}' is not one of " +
                             ("'none', 'auto' or {\"name\": ...}" if plan.legacy else
                              "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"),
                             param=param)
    else:
        plan.mode = choice or ("auto" if plan.tools else "none")
    if plan.mode != "none" and not plan.tools:
        if plan.mode == "auto":
            plan.mode = "none"
        else:
            raise InvalidRequest(f"{param} '{plan.mode}' needs tools to choose from", param=param)
    plan.parallel = request.parallel_tool_calls is not False and not plan.legacy and plan.mode != "named"
    plan.fmt = config.function.tool_format or detect_format(template)
    try:
        plan.grammar = _grammar(request, config, plan)
    except RecursionError:
        param = "response_format" if request.response_format is not None else "tools"
        raise InvalidRequest("the JSON schema is nested too deeply to build a grammar from it", param=param) from None
    return plan


def _grammar(request: ChatCompletionRequest, config: ModelConfig, plan: Plan) -> str:
    """The one grammar this request's output must follow (empty for free text)."""
    builder = GrammarBuilder()
    content_rule = None
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        if request.grammar:
            raise InvalidRequest("send either grammar or response_format, not both", param="grammar")
        if response_format.type == "json_object":
            content_rule = builder.primitive("object")
        else:
            schema_format = response_format.json_schema
            if schema_format is None:
                raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' object",
                                     param="response_format.json_schema")
            schema = schema_format.schema_ if schema_format.schema_ is not None else {"type": "object"}
            try:
                content_rule = builder.schema(strict_schema(schema) if schema_format.strict else schema, "response")
            except SchemaNotSupported as exc:
                raise InvalidRequest(str(exc), param="response_format.json_schema.schema") from None
    if config.function.grammar.disable:
        return request.grammar or (builder.render(content_rule) if content_rule is not None else "")
    forced = plan.mode in ("required", "named")
    if forced or plan.mode == "auto":
        if request.grammar:
            raise InvalidRequest("a grammar cannot be combined with tools", param="grammar")
        param = "functions" if plan.legacy else "tools"
        for index, tool in enumerate(plan.tools):  # check each alone, so the error can say which one
            try:
                GrammarBuilder().schema(tool.get("parameters") or {"type": "object"}, "arguments")
            except SchemaNotSupported as exc:
                if plan.mode == "auto" and content_rule is None:
                    return ""  # calls are still parsed; only forced calls must be constrained
                where = f"{param}[{index}].parameters" if plan.legacy else f"{param}[{index}].function.parameters"
                raise InvalidRequest(f"function '{tool['name']}': {exc}", param=where) from None
        tools = [t for t in plan.tools if plan.forced in (None, t["name"])]
        # tool_choice auto: free text until a call begins, then the call follows its schema (a lazy grammar);
        # with a response_format the content has a grammar too, so the whole output does.
        plan.lazy = plan.mode == "auto" and content_rule is None
        return tool_call_grammar(plan.fmt, tools, plan.parallel,
                                 content_rule=content_rule if plan.mode == "auto" else None, builder=builder,
                                 name_key=config.function.function_name_key, arguments_key=_arguments_key(config),
                                 lazy=plan.lazy)
    if content_rule is not None:
        return builder.render(content_rule)
    return request.grammar or ""


def _arguments_key(config: ModelConfig) -> str | None:
    key = config.function.function_arguments_key
    return None if key == "arguments" else key


def _template_messages(request: ChatCompletionRequest, plan: Plan, native: bool) -> list[dict[str, Any]]:
    """The conversation as the template gets it; calls and results are spelled out when it has no tool support."""
    messages = []
    names_by_id: dict[str, str] = {}
    for message in request.messages:
        item = message.model_dump(exclude_none=True)
        if item["role"] == "developer":
            item["role"] = "system"  # OpenAI's newer name; chat templates know "system"
        if message.function_call is not None:  # the legacy shape of a call
            item.pop("function_call")
            item["tool_calls"] = [{"id": "", "type": "function", "function": message.function_call.model_dump()}]
        if item["role"] == "function":
            item["role"] = "tool"
        for call in item.get("tool_calls", []):
            names_by_id[call.get("id", "")] = call["function"]["name"]
        if not native:
            if item.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}
                         for c in item.pop("tool_calls")]
                text = item.get("content") if isinstance(item.get("content"), str) else ""
                item["content"] = "\n".join(x for x in (text, call_text(plan.fmt, calls)) if x)
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


def _image_urls(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(url, param) of every image part, in conversation order."""
    found = []
    for index, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for number, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    found.append((part.image_url.url, f"messages[{index}].content[{number}].image_url.url"))
    return found


async def _images(request: ChatCompletionRequest, engine: Engine, capabilities: list[str]) -> list[bytes]:
    """The request's images, loaded before the runner sees anything; a 400 if the model takes none."""
    urls = _image_urls(request)
    if not urls:
        return []
    if "vision" not in capabilities:
        takes = sorted(c.name for c in engine.registry.models() if "vision" in c.usecases)
        where = (f"; installed models that do: {', '.join(takes)}" if takes else
                 "; no installed model takes images (a vision-language model is needed)")
        raise CapabilityNotSupported(f"model '{request.model}' does not accept images{where}", param="messages")
    policy = ImagePolicy.from_settings(engine.settings)
    return list(await asyncio.gather(*(load_image(url, policy, param) for url, param in urls)))


def _chunk(request_id: str, created: int, model: str, index: int, delta: dict[str, Any],
           finish: str | None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
            "finish_reason": finish,
        }],
    }


def _call_delta(item: ToolCallDelta, legacy: bool) -> dict[str, Any]:
    if legacy:
        function = {"name": item.name, "arguments": ""} if item.name else {"arguments": item.arguments}
        return {"function_call": function}
    if item.name:
        return {"tool_calls": [{"index": item.index, "id": item.id, "type": "function",
                                "function": {"name": item.name, "arguments": item.arguments}}]}
    return {"tool_calls": [{"index": item.index, "function": {"arguments": item.arguments}}]}


async def prepare(request: ChatCompletionRequest, engine: Engine, config: ModelConfig,
                  runner: Any) -> tuple[str, Plan, list[bytes]]:
    """The rendered prompt, the tool/format plan and the loaded images of a chat request, for a ready runner."""
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
    prompt = render_chat(template, _template_messages(request, plan, native), bos_token=info.bos_token,
                         eos_token=info.eos_token, strip_bos=info.add_bos, tools=tools,
                         keep_parts="vision" in info.capabilities,
                         media_marker=info.metadata.get("media_marker", "") if images else "")
    return prompt, plan, images


async def count_prompt_tokens(request: ChatCompletionRequest, engine: Engine) -> int:
    """How many tokens the chat request's prompt is, as the model reads it (template and tools included)."""
    _refuse_unsupported(request)
    config = engine.model(request.model)
    async with engine.runner(config, "generate") as runner:
        prompt = (await prepare(request, engine, config, runner))[0]
        tokens = await runner.call("tokenize", prompt, add_special=True, parse_special=True)
    return len(tokens)


async def chat_completion_events(request: ChatCompletionRequest, engine: Engine) -> AsyncIterator[dict[str, Any]]:
    """The chat completion as OpenAI stream chunks; the first arrives only once generation has begun."""
    _refuse_unsupported(request)
    config = engine.model(request.model)
    stops = stop_list(request, config)
    sampling = sampling_params(request, config)
    max_tokens = request.max_completion_tokens or request.max_tokens or config.parameters.max_tokens or 0
    n = request.n or 1
    request_id, created = new_id("chatcmpl"), now()

    async with engine.runner(config, "generate") as runner:
        prompt, plan, images = await prepare(request, engine, config, runner)
        sampling.grammar = plan.grammar
        if plan.lazy:
            sampling.grammar_triggers.extend(lazy_triggers(plan.fmt, [t["name"] for t in plan.tools],
                                                           config.function.function_name_key))
        if plan.grammar and request.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a grammar, tools or response_format",
                                 param="ignore_eos")

        async def choice(index: int) -> AsyncIterator[dict[str, Any]]:
            generate = pb.GenerateRequest(
                prompt=prompt, parse_special=True, add_special=True, max_tokens=max_tokens, stop=stops,
                sampling=with_seed(sampling, index), request_id=request_id, ignore_eos=request.ignore_eos,
                logprobs=bool(request.logprobs), top_logprobs=request.top_logprobs or 0, images=images)
            parser = None
            if plan.mode != "none":
                parser = ToolCallParser(names={t["name"] for t in plan.tools}, parallel=plan.parallel,
                                        name_key=config.function.function_name_key,
                                        arguments_key=config.function.function_arguments_key)

            def chunk(delta: dict[str, Any], finish: str | None = None,
                      logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
                return _chunk(request_id, created, request.model, index, delta, finish, logprobs)

            def deltas(events: list[Any]) -> list[dict[str, Any]]:
                return [{"content": e} if isinstance(e, str) else _call_delta(e, plan.legacy) for e in events]

            first = True
            async for reply in runner.generate(generate):
                if first:
                    opening = chunk({"role": "assistant", "content": ""})
                    if reply.HasField("usage") and not reply.finish_reason:
                        opening[PROMPT_KEY] = reply.usage
                    yield opening
                    first = False
                out = []
                if reply.text:
                    out = deltas(parser.feed(reply.text)) if parser else [{"content": reply.text}]
                # A token's logprob rides on the first chunk of its step (text may be held back, e.g. a stop
                # string's start or a call's markup, and arrive later or never).
                logprobs = chat_logprobs(reply.logprobs) if request.logprobs and reply.logprobs else None
                if logprobs and not out:
                    out = [{}]
                for i, delta in enumerate(out):
                    yield chunk(delta, logprobs=logprobs if i == 0 else None)
                if reply.finish_reason:
                    for delta in deltas(parser.close()) if parser else []:
                        yield chunk(delta)
                    finish = reply.finish_reason
                    if parser is not None and parser.calls and finish == "stop":
                        finish = "function_call" if plan.legacy else "tool_calls"
                    final = chunk({}, finish)
                    final["timings"] = timings_dict(reply.timings)
                    final[USAGE_KEY] = reply.usage if index == 0 else only_completion(reply.usage)
                    final[STOP_KEY] = reply.stop_sequence
                    yield final

        if n == 1:
            async for item in choice(0):
                yield item
        else:
            async for item in merge([choice(i) for i in range(n)]):
                yield item


async def create_chat_completion(request: ChatCompletionRequest, engine: Engine) -> dict[str, Any]:
    """The whole (non-streaming) chat completion response, assembled from the same chunks a stream gets."""
    choices: dict[int, dict[str, Any]] = {}
    finals: list[dict[str, Any]] = []
    request_id, created, timings = "", 0, None
    legacy = request.functions is not None
    async for chunk in chat_completion_events(request, engine):
        request_id, created = chunk["id"], chunk["created"]
        item = chunk["choices"][0]
        state = choices.setdefault(item["index"], {"content": [], "calls": [], "logprobs": [], "finish": "stop"})
        delta = item["delta"]
        state["content"].append(delta.get("content") or "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                state["calls"].append({"id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}})
            state["calls"][call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if "function_call" in delta:
            if "name" in delta["function_call"]:
                state["calls"].append({"function": {"name": delta["function_call"]["name"], "arguments": ""}})
            state["calls"][-1]["function"]["arguments"] += delta["function_call"]["arguments"]
        if item["logprobs"] is not None:
            state["logprobs"].extend(item["logprobs"]["content"])
        if item["finish_reason"]:
            state["finish"] = item["finish_reason"]
            finals.append(chunk)
            timings = chunk["timings"]

    def message(state: dict[str, Any]) -> dict[str, Any]:
        content = "".join(state["content"])
        result: dict[str, Any] = {"role": "assistant", "content": content or None if state["calls"] else content,
                                  "refusal": None}
        if state["calls"] and legacy:
            result["function_call"] = state["calls"][0]["function"]
        elif state["calls"]:
            result["tool_calls"] = state["calls"]
        return result

    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [{
            "index": index,
            "message": message(state),
            "logprobs": {"content": state["logprobs"], "refusal": None} if request.logprobs else None,
            "finish_reason": state["finish"],
        } for index, state in sorted(choices.items())],
        "usage": total_usage(finals),
        "timings": timings,
    }


router = APIRouter()


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    return await respond(request, body.stream, body.include_usage(), lambda: chat_completion_events(body, engine),
                         lambda: create_chat_completion(body, engine))
