"""A deterministic backend for testing API semantics without a real model.

Tokens are UTF-8 bytes (id = byte + 3; 1 is BOS, 2 is EOS). The reply is fixed for a given prompt, options
and seed, so tests can assert on exact text. Options come from the model YAML's `fake:` block:

    fake:
      reply: "text"          # the greedy reply; default names the prompt's length in tokens
      token_delay: 0.05      # seconds per generated token (for streaming, cancellation, crash tests)
      load_delay: 1.0        # seconds to "load"
      fail_load: "reason"    # make loading fail with this reason
      chat_template: "..."   # a Jinja chat template; default is ChatML; "" for none
      echo_prompt: true      # reply with the prompt text itself (to check what a template rendered)
      vision: true           # accept images in chat (they are loaded and checked by the server, then ignored)

Logprobs are made up but fixed (each token is its own most likely choice). Grammars are not enforced: tests of
constrained output run on a real model.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import (
    GenerationChunk,
    GenerationSpec,
    LoadSpec,
    ModelDescription,
    StopBuffer,
    TokenLogprob,
)
from hearth.errors import ContextLengthExceeded, InvalidRequest, ModelLoadFailed

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BOS, EOS, OFFSET = 1, 2, 3
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


class Backend(BaseBackend):
    name = "fake"

    def __init__(self) -> None:
        self.options: dict = {}
        self.context_size = 2048
        self._active = 0
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        self.options = dict(spec.config.get("fake") or {})
        time.sleep(float(self.options.get("load_delay", 0)))
        if self.options.get("fail_load"):
            raise ModelLoadFailed(str(self.options["fail_load"]))
        self.context_size = spec.context_size or 2048
        template = self.options.get("chat_template", CHATML)
        return ModelDescription(
            backend=self.name,
            capabilities=(["generate", "chat", "tokenize"] if template else ["generate", "tokenize"]) +
            (["vision"] if self.options.get("vision") else []),
            context_size=self.context_size,
            train_context_size=self.context_size,
            chat_template=template or "",
            bos_token="<s>",
            eos_token="</s>",
            add_bos=False,
            architecture="fake",
        )

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def detokenize(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not OFFSET <= t < 256 + OFFSET and t not in (BOS, EOS)]
        if bad:
            raise InvalidRequest(f"token {bad[0]} is not in the vocabulary (0..{255 + OFFSET})", param="tokens")
        return bytes(t - OFFSET for t in tokens if t >= OFFSET).decode("utf-8", errors="replace")

    def _reply(self, prompt_tokens: int, spec: GenerationSpec) -> list[str]:
        temperature = spec.sampling.temperature
        if self.options.get("echo_prompt"):
            return re.findall(r"\S+\s*|\s+", spec.prompt or "")
        if temperature is None or temperature <= 0:
            reply = str(self.options.get("reply", f"Hello! Your prompt was {prompt_tokens} tokens long."))
            return re.findall(r"\S+\s*|\s+", reply)
        rng = random.Random(spec.sampling.seed)
        length = int(self.options.get("sample_length", 12))
        return [rng.choice(WORDS) + " " for _ in range(length)]

    def active_requests(self) -> int:
        return self._active

    def generate(self, spec: GenerationSpec, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        if spec.suffix is not None:
            raise InvalidRequest("this model has no fill-in-the-middle tokens, so 'suffix' is not supported",
                                 param="suffix")
        tokens = spec.prompt_tokens if spec.prompt_tokens is not None else self.tokenize(spec.prompt or "", True, True)
        if len(tokens) >= self.context_size:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens, but the model's context is {self.context_size} tokens",
                param="messages")
        with self._lock:
            self._active += 1
        try:
            yield from self._run(spec, len(tokens), cancelled)
        finally:
            with self._lock:
                self._active -= 1

    def _run(self, spec: GenerationSpec, n_prompt: int, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        started = time.perf_counter()
        delay = float(self.options.get("token_delay", 0))
        stops = StopBuffer(spec.stop)
        produced = 0
        finish = "stop"
        hit = False
        budget = spec.max_tokens or (self.context_size - n_prompt)
        for piece in self._reply(n_prompt, spec):
            if cancelled():
                return
            if produced >= budget:
                finish = "length"
                break
            if delay:
                time.sleep(delay)
            produced += 1
            text, hit = stops.push(piece)
            if spec.logprobs:
                yield GenerationChunk(text=text, token_count=1, logprobs=[_logprob(piece, spec.top_logprobs)])
            elif text:
                yield GenerationChunk(text=text, token_count=1)
            if hit:
                break
        if not hit:
            tail = stops.flush()
            if tail:
                yield GenerationChunk(text=tail)
        elapsed = (time.perf_counter() - started) * 1000
        yield GenerationChunk(finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=produced,
                              prompt_ms=0.0, predicted_ms=elapsed, stop_sequence=stops.matched)


def _logprob(piece: str, top: int) -> TokenLogprob:
    """A made-up but fixed log probability for a fake token: the token itself is always the most likely."""
    data = piece.encode("utf-8")
    own = -(len(data) % 5) / 8

    def entry(text: str, logprob: float) -> TokenLogprob:
        raw = text.encode("utf-8")
        return TokenLogprob(token=(raw[0] if raw else 0) + OFFSET, text=text, logprob=logprob, bytes=raw)

    alternatives = [entry(piece, own)]
    alternatives += [entry(word + " ", own - 1 - i) for i, word in enumerate(w for w in WORDS if w + " " != piece)]
    chosen = entry(piece, own)
    chosen.top = alternatives[:top]
    return chosen
