"""Turn llama.cpp's chat-parser test cases (tests/test-chat.cpp) into data: tests/data/llama-chat-cases.json.

Run by hand against the llama-cpp-python sdist's vendored llama.cpp, e.g.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/port_test_chat.py llama_cpp_python-0.3.36/vendor/llama.cpp

Only facts move: each case's template, model output, options and expected message. The C++ is read with a small
tokenizer of our own (no C++ parser library reads string-literal concatenation and raw strings into values, and
the file's builder chains are regular). A case whose arguments cannot be read as literals is listed with the
reason in `skipped`, not dropped silently. The vendored templates are copied beside the cases, since the tests
render them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

TOKEN = re.compile(r'''
    (?P<space>\s+|//[^\n]*|/\*.*?\*/)
  | R"(?P<delim>[^(\s]*)\((?P<raw>.*?)\)(?P=delim)"
  | "(?P<str>(?:[^"\\]|\\.)*)"
  | '(?:[^'\\]|\\.)'
  | (?P<word>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<number>\d+)
  | (?P<punct>\.|,|\(|\)|\{|\}|;|&|=|\*|<|>|\[|\]|:|\+|-|!|\||\?|/|%|~|\^)
''', re.S | re.X)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
REASONING = {"COMMON_REASONING_FORMAT_NONE": "none", "COMMON_REASONING_FORMAT_AUTO": "auto",
             "COMMON_REASONING_FORMAT_DEEPSEEK": "deepseek",
             "COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY": "deepseek_legacy"}


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u":
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        elif nxt == "x":
            out.append(chr(int(text[i + 2:i + 4], 16)))
            i += 4
        else:
            out.append(ESCAPES[nxt])
            i += 2
    # C++ source strings are UTF-8 bytes; \x escapes spell bytes of it too.
    joined = "".join(out)
    try:
        return joined.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return joined


def tokens(source: str) -> list[tuple[str, str]]:
    found, pos = [], 0
    while pos < len(source):
        match = TOKEN.match(source, pos)
        if not match:
            found.append(("punct", source[pos]))
            pos += 1
            continue
        pos = match.end()
        if match.group("space") is not None:
            continue
        if match.group("raw") is not None:
            found.append(("str", match.group("raw")))
        elif match.group("str") is not None:
            found.append(("str", unescape(match.group("str"))))
        elif match.group("word") is not None:
            found.append(("word", match.group("word")))
        elif match.group("number") is not None:
            found.append(("number", match.group("number")))
        else:
            found.append(("punct", match.group(0)))
    # Adjacent string literals are one string.
    merged: list[tuple[str, str]] = []
    for kind, value in found:
        if kind == "str" and merged and merged[-1][0] == "str":
            merged[-1] = ("str", merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


def group(toks: list[tuple[str, str]], start: int) -> int:
    """Index just past the bracket group opening at `start`."""
    depth = 0
    for i in range(start, len(toks)):
        if toks[i][1] in "({[" and toks[i][0] == "punct":
            depth += 1
        elif toks[i][1] in ")}]" and toks[i][0] == "punct":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced")


def split_args(toks: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Top-level comma-separated parts of a token list."""
    parts, current, depth = [], [], 0
    for tok in toks:
        if tok[0] == "punct" and tok[1] in "({[":
            depth += 1
        elif tok[0] == "punct" and tok[1] in ")}]":
            depth -= 1
        if depth == 0 and tok == ("punct", ","):
            parts.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        parts.append(current)
    return parts


class Unreadable(Exception):
    pass


class Reader:
    def __init__(self, toks: list[tuple[str, str]]) -> None:
        self.toks = toks
        self.tools: dict[str, dict] = {}
        self.strings: dict[str, str] = {}
        self.messages: dict[str, dict] = {}
        self._declarations()

    def _declarations(self) -> None:
        t = self.toks
        for i in range(len(t) - 3):
            if t[i] == ("word", "common_chat_tool") and t[i + 1][0] == "word" and t[i + 2] == ("punct", "{"):
                end = group(t, i + 2)
                parts = split_args(t[i + 3:end - 1])
                values = [p[0][1] for p in parts if p and p[0][0] == "str"]
                if len(values) == 3:
                    self.tools[t[i + 1][1]] = {"name": values[0], "description": values[1],
                                               "parameters": json.loads(values[2])}
            if t[i] == ("word", "char") and t[i + 1] == ("punct", "*") and t[i + 3] == ("punct", "=") and \
                    t[i + 4][0] == "str":
                self.strings[t[i + 2][1]] = t[i + 4][1]
            if t[i] == ("word", "common_chat_msg") and t[i + 1][0] == "word" and t[i + 2] == ("punct", "="):
                with_call = t[i + 3:]
                try:
                    end = group(with_call, 1)
                    self.messages[t[i + 1][1]] = self.message(with_call[:end])
                except (Unreadable, ValueError, IndexError):
                    pass

    def string(self, toks: list[tuple[str, str]]) -> str:
        if len(toks) == 1 and toks[0][0] == "str":
            return toks[0][1]
        if len(toks) == 1 and toks[0][0] == "word" and toks[0][1] in self.strings:
            return self.strings[toks[0][1]]
        raise Unreadable("not a string literal: " + " ".join(v for _, v in toks)[:60])

    def call(self, name: str, args: list[str], ids: str = "") -> dict:
        return {"name": name, "arguments": args, "id": ids}

    def message(self, toks: list[tuple[str, str]]) -> dict:
        if len(toks) == 1 and toks[0][0] == "word":
            if toks[0][1] not in self.messages:
                raise Unreadable(f"message {toks[0][1]}")
            return self.messages[toks[0][1]]
        if len(toks) < 3 or toks[0][0] != "word" or toks[1] != ("punct", "("):
            raise Unreadable("message expression")
        fn = toks[0][1]
        parts = split_args(toks[2:group(toks, 1) - 1])
        if fn == "simple_assist_msg":
            values = [self.string(p) for p in parts] + [""] * 5
            content, reasoning, name, arguments, ids = values[:5]
            calls = [self.call(name, arguments, ids)] if name or ids else []
            return {"content": content, "reasoning": reasoning, "tool_calls": calls}
        if fn == "message_with_tool_calls":
            return {"content": "", "reasoning": "", "tool_calls": [self.call(self.string(parts[0]),
                                                                             self.string(parts[1]))]}
        if fn in ("message_with_tool_calls_and_reasoning",):
            return {"content": "", "reasoning": self.string(parts[2]),
                    "tool_calls": [self.call(self.string(parts[0]), self.string(parts[1]))]}
        if fn == "message_with_content_and_tool_call":
            return {"content": self.string(parts[0]), "reasoning": "",
                    "tool_calls": [self.call(self.string(parts[1]), self.string(parts[2]))]}
        if fn == "message_with_reasoning_and_tool_call":
            return {"content": "", "reasoning": self.string(parts[0]),
                    "tool_calls": [self.call(self.string(parts[1]), self.string(parts[2]))]}
        if fn == "message_with_reasoning_content_and_multiple_tool_calls":
            calls = [self.call(*[self.string(x) for x in split_args(c[1:-1])]) for c in split_args(parts[2][1:-1])]
            return {"content": self.string(parts[1]), "reasoning": self.string(parts[0]), "tool_calls": calls}
        raise Unreadable(f"message built by {fn}")

    def tool_calls(self, toks: list[tuple[str, str]]) -> list[dict]:
        calls = []
        for item in split_args(toks[1:-1]):
            values = [self.string(p) for p in split_args(item[1:-1]) if p != [("punct", "{"), ("punct", "}")]]
            values += [""] * 3
            calls.append(self.call(values[0], values[1], values[2]))
        return calls


def chains(reader: Reader, toks: list[tuple[str, str]], template: str | None, cases: list, skipped: list) -> None:
    """Every `tst.test(...)....run()` chain in `toks`, as cases of `template`."""
    i = 0
    while i < len(toks) - 2:
        if toks[i] == ("word", "tst") and toks[i + 1] == ("punct", ".") and toks[i + 2] == ("word", "test"):
            start = i
            calls = []
            j = i + 2
            while True:
                name = toks[j][1]
                end = group(toks, j + 1)
                calls.append((name, toks[j + 2:end - 1]))
                j = end
                if name == "run" or toks[j] != ("punct", "."):
                    break
                j += 1
            i = j
            case = {"template": template, "options": {}, "expect": {"content": "", "reasoning": "",
                                                                     "tool_calls": []}, "partial": False}
            try:
                for name, args in calls:
                    read(reader, case, name, args)
            except (Unreadable, KeyError, json.JSONDecodeError, IndexError, ValueError) as exc:
                skipped.append({"template": template, "at_token": start, "reason": str(exc)[:120],
                                "input": case.get("input", "")[:80]})
                continue
            cases.append(case)
            continue
        i += 1


def read(reader: Reader, case: dict, name: str, args: list[tuple[str, str]]) -> None:
    options = case["options"]
    if name == "test":
        case["input"] = reader.string(args)
    elif name == "reasoning_format":
        options["reasoning_format"] = REASONING[args[0][1]]
    elif name in ("enable_thinking", "parallel_tool_calls", "add_generation_prompt"):
        options[name] = args[0][1] == "true"
    elif name == "is_partial":
        case["partial"] = args[0][1] == "true"
    elif name == "tools":
        options["tools"] = [reader.tools[p[0][1]] for p in split_args(args[1:-1])]
    elif name == "json_schema":
        options["json_schema"] = json.loads(reader.string(args))
    elif name == "tool_choice":
        options["tool_choice"] = args[0][1].rsplit("_", 1)[-1].lower()
    elif name == "expect":
        case["expect"] = json.loads(json.dumps(reader.message(args)))
    elif name == "expect_content":
        case["expect"]["content"] = reader.string(args)
    elif name == "expect_reasoning":
        case["expect"]["reasoning"] = reader.string(args)
    elif name == "expect_tool_calls":
        case["expect"]["tool_calls"] = reader.tool_calls(args)
    elif name in ("messages", "continue_final_message"):
        raise Unreadable(f"{name}: a continued (prefilled) assistant message, which Hearth's API has no field for")
    elif name in ("run", "expect_reconstruction"):
        pass
    else:
        raise Unreadable(f"unknown builder call {name}")


def main(root: Path, out: Path) -> None:
    source = (root / "tests" / "test-chat.cpp").read_text()
    toks = tokens(source)
    reader = Reader(toks)
    cases: list[dict] = []
    skipped: list[dict] = []
    # Scopes: each `peg_tester(X)` starts the template of the chains that follow it.
    marks = [i for i in range(len(toks) - 2) if toks[i] == ("word", "peg_tester") and toks[i + 1] == ("punct", "(")]
    lfm2 = [t for t in re.findall(r'"(models/templates/LFM2[^"]*)"', source)]
    loop_paths = re.findall(r"for \(const auto & path :\s*\{([^}]*)\}", source)
    for n, mark in enumerate(marks):
        stop = marks[n + 1] if n + 1 < len(marks) else len(toks)
        arg = toks[mark + 2]
        scope = toks[mark:stop]
        if arg[0] == "str":
            templates = [arg[1]]
        elif arg[1] == "template_path":
            templates = list(dict.fromkeys(lfm2))
        elif arg[1] == "path" and loop_paths:
            templates = re.findall(r'"([^"]+)"', loop_paths[0])
        else:
            templates = []
        for template in templates:
            chains(reader, scope, template.removeprefix("models/templates/"), cases, skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": "llama.cpp tests/test-chat.cpp (llama-cpp-python 0.3.36 sdist)",
                               "cases": cases, "skipped": skipped}, indent=1, ensure_ascii=False) + "\n")
    templates_dir = out.parent / "templates"
    templates_dir.mkdir(exist_ok=True)
    for path in sorted((root / "models" / "templates").glob("*.jinja")):
        shutil.copyfile(path, templates_dir / path.name)
    shutil.copyfile(root / "LICENSE", out.parent / "LICENSE")  # llama.cpp's MIT licence covers the copied data
    print(f"{len(cases)} cases, {len(skipped)} skipped, {len(list(templates_dir.glob('*.jinja')))} templates")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data/llama-chat/cases.json"))
