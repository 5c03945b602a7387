"""Reading a model's output: its thoughts, its answer and its tool calls, in its family's format.

`parse(text, family, options)` reads the whole output so far (`partial` while it is still being generated: a marker
cut in half is held back, a call not yet decidable is not given out). `OutputReader` turns successive partial
parses into deltas, so a stream never gives out text it would later take back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hearth.chat.calls import MAX_PARALLEL_CALLS, Call, Options, Parsed, held
from hearth.chat.families import Family


def parse(text: str, family: Family, options: Options, think: tuple[str, ...] = (), partial: bool = False) -> Parsed:
    """The model's thoughts, answer and calls in `text` (all of the output so far)."""
    if family.special is not None:
        return family.special(text, options, partial)
    think = think or family.think
    if family.noise:
        text = text.replace(family.noise, "")
        text = text[: len(text) - held(text, [family.noise])]  # (one cut in half is noise too)
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
                keep = held(rest, list(closers) + call_markers) if partial else 0
                result.reasoning = rest[: len(rest) - keep].strip()
                return result
    elif not options.reasoning and options.thinking_open:
        rest = options.thinking_open + rest
    content, calls = _split_calls(rest, family, options, partial)
    if partial and family.unwrap:
        content = content[: len(content) - held(content, list(family.unwrap))]
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
            keep = held(tail, syntax.markers()) if partial else 0
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
