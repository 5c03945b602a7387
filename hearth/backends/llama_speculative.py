"""Speculative decoding's drafts: tokens guessed cheaply, which the model then checks in the step it takes anyway.

On a CPU each step reads every weight once, so checking a few guessed tokens beside the one a sequence must decode
costs little more than decoding that one; every guess the model agrees with is a token gained. Two ways to guess,
named as llama.cpp's `--spec-type` (and LocalAI's `options: ["spec_type:..."]`) name them:

- `ngram-simple`: the sequence's own prompt and output. The last few tokens are looked up where they occurred
  before, and what followed then is the guess (prompt lookup): an answer that repeats its prompt (a code edit, a
  summary quoting its source) is guessed many tokens at a time.
- `draft-simple`: a small model with the same vocabulary (`draft_model:`), run greedily a few tokens ahead in the
  same runner, with its own KV cache per sequence.

The scheduler (llama_scheduler.py) puts the guesses in the batch after each sequence's next token, samples every
position in order with the sequence's own sampler, keeps the guesses up to the first one the sampler did not pick,
and removes the rest from the KV cache. A guess is kept exactly when the sampler, run as it would run without
speculation, picks it, so the output is the same with and without (greedy or seeded): the standard acceptance rule
for a guess of probability one.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import llama_cpp.llama_cpp as L
import numpy as np

from hearth.errors import ModelLoadFailed

log = logging.getLogger("hearth.runner.llama")

# llama.cpp's check that a draft model may guess for a target (common/speculative.cpp): vocabularies of the same
# kind whose sizes differ by at most this, the same special tokens, and the same text for every token both have.
VOCAB_SIZE_DIFFERENCE = 128
BATCH = 512


class NgramIndex:
    """Where each run of `n` tokens of a sequence occurred, kept as the sequence grows: a guess costs a dictionary
    lookup, not a search of the whole sequence at every step. Runs in a stretch since cut off (rejected guesses)
    are found stale when looked up, and dropped.

    A guess goes on from where the previous one was taken while the sequence still follows it there: a text that
    copies its prompt meets runs that occur several times (`continue` and an indent, a closing bracket), and the
    latest earlier occurrence of such a run, llama.cpp's choice, is often not the place being copied. Only when the
    sequence left that place is the run looked up anew."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.starts: dict[tuple[int, ...], list[int]] = {}
        self.indexed = 0  # runs starting before this have been indexed
        self.source = -1  # where the previous guess was taken from (an index into the sequence) ...
        self.at = 0  # ... for the token at this index

    def guess(self, tokens: list[int], last: int, n_max: int) -> list[int]:
        """Up to `n_max` tokens guessed to follow `tokens` + [`last`]: those that followed an earlier run of the
        same `n` tokens (the one the previous guess came from, if the sequence still follows it, else the latest)."""
        n = self.n
        end = len(tokens) - n + 1  # runs starting before this lie within `tokens`
        for start in range(self.indexed, end):
            self.starts.setdefault(tuple(tokens[start:start + n]), []).append(start)
        self.indexed = max(self.indexed, end)
        if len(tokens) < n:
            return []
        key = (*tokens[len(tokens) - n + 1:], last)
        here = len(tokens) + 1
        follow = self.source + here - self.at if self.source >= 0 else -1
        if n <= follow < len(tokens) and tuple(tokens[follow - n:follow]) == key:
            self.source, self.at = follow, here
            return tokens[follow:follow + n_max]
        found = self.starts.get(key)
        while found and (found[-1] + n > len(tokens) or tuple(tokens[found[-1]:found[-1] + n]) != key):
            found.pop()  # in a stretch since cut off
        if not found:
            self.source = -1
            return []
        self.source, self.at = found[-1] + n, here
        return tokens[self.source:self.source + n_max]

    def cut(self, length: int) -> None:
        """The sequence was cut to `length` tokens: the runs past that are indexed again as it grows back."""
        self.indexed = min(self.indexed, max(length - self.n + 1, 0))


class DraftModel:
    """A small model guessing for the target, in the target's runner: its own context, one KV sequence per target
    sequence, holding what that sequence holds (caught up before each guess)."""

    def __init__(self, path: str, target_model: Any, n_seq: int, n_ctx_seq: int, threads: int, load_mode: int) -> None:
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = load_mode  # read in or mapped, by the target's rule
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise ModelLoadFailed(f"llama.cpp could not load the draft model {path.rsplit('/', 1)[-1]}")
        try:
            self.vocab = L.llama_model_get_vocab(self.model)
            problem = vocabulary_difference(L.llama_model_get_vocab(target_model), self.vocab)
            if problem:
                raise ModelLoadFailed(f"draft_model {path.rsplit('/', 1)[-1]} cannot guess for this model: {problem}")
            self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
            cparams = L.llama_context_default_params()
            cparams.n_ctx = n_ctx_seq * n_seq
            cparams.n_batch = cparams.n_ubatch = BATCH
            cparams.n_seq_max = n_seq
            cparams.kv_unified = False
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.no_perf = True
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelLoadFailed("llama.cpp could not create a context for the draft model")
        except BaseException:
            L.llama_model_free(self.model)
            raise
        self.memory = L.llama_get_memory(self.ctx)
        self.held: list[list[int]] = [[] for _ in range(n_seq)]  # the tokens each draft sequence holds
        self.batch = L.llama_batch_init(BATCH, 0, 1)
        self.threads = threads
        self.caught_up = 0  # the most tokens a sequence had to be caught up with in the last guess

    def set_threads(self, threads: int) -> None:
        if threads != self.threads:
            L.llama_set_n_threads(self.ctx, threads, threads)
            self.threads = threads

    def forget(self, seq: int) -> None:
        L.llama_memory_seq_rm(self.memory, seq, 0, -1)
        self.held[seq] = []

    def behind(self, seq: int, length: int) -> int:
        """About how many tokens the draft must read before it can guess for the sequence, `length` tokens long."""
        return length + 1 - len(self.held[seq])

    def guess(self, wanted: dict[int, tuple[list[int], int]], n_max: int, p_min: float) -> dict[int, list[int]]:
        """Greedy guesses for several sequences at once: `wanted` maps a sequence to (its tokens, its next token);
        each step decodes one token of every sequence still guessing, after catching each up to its tokens."""
        guesses: dict[int, list[int]] = {seq: [] for seq in wanted}
        feed: dict[int, list[int]] = {}
        self.caught_up = 0
        for seq, (tokens, last) in wanted.items():
            full = [*tokens, last]
            held = self.held[seq]
            keep = 0
            limit = min(len(held), len(full) - 1)  # the last token is always decoded, for its logits
            while keep < limit and held[keep] == full[keep]:
                keep += 1
            if keep < len(held):
                L.llama_memory_seq_rm(self.memory, seq, keep, -1)
                del held[keep:]
            feed[seq] = full[keep:]
            self.caught_up = max(self.caught_up, len(feed[seq]))
        while feed:
            rows = self._decode(feed)
            feed = {}
            for seq, row in rows.items():
                logits = self._logits(row)
                token = int(logits.argmax())
                if p_min > 0 and _top_probability(logits, token) < p_min:
                    continue
                guesses[seq].append(token)
                if len(guesses[seq]) < n_max and not L.llama_vocab_is_eog(self.vocab, token):
                    feed[seq] = [token]
        return guesses

    def _decode(self, feed: dict[int, list[int]]) -> dict[int, int]:
        """Decode each sequence's tokens; returns each one's output row (its last token's). All in one batch when
        they fit, else the long catch-ups (a new prompt) first, in bites, up to their last token."""
        feed = {seq: tokens for seq, tokens in feed.items() if tokens}
        if sum(map(len, feed.values())) > BATCH:
            for seq, tokens in feed.items():
                for start in range(0, len(tokens) - 1, BATCH):
                    self._run([(seq, tokens[start:min(start + BATCH, len(tokens) - 1)])])
                feed[seq] = tokens[-1:]
        return self._run(sorted(feed.items()))

    def _run(self, feed: list[tuple[int, list[int]]]) -> dict[int, int]:
        batch, n, rows = self.batch, 0, {}
        for seq, tokens in feed:
            for token in tokens:
                batch.token[n] = token
                batch.pos[n] = len(self.held[seq])
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = False
                self.held[seq].append(token)
                n += 1
            batch.logits[n - 1] = True
            rows[seq] = n - 1
        batch.n_tokens = n
        if L.llama_decode(self.ctx, batch) != 0:
            for seq, _ in feed:
                self.forget(seq)
            raise RuntimeError("the draft model's llama_decode failed")
        return rows

    def _logits(self, row: int) -> np.ndarray:
        pointer = L.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def close(self) -> None:
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


def _top_probability(logits: np.ndarray, token: int) -> float:
    return 1.0 / float(np.exp(logits - logits[token]).sum())  # (the token is the top one: no overflow)


def vocabulary_difference(target: Any, draft: Any) -> str:
    """Why a draft model's vocabulary cannot guess for the target's (empty when it can): llama.cpp's rules."""
    if L.llama_vocab_type(target) != L.llama_vocab_type(draft):
        return "its vocabulary is of another kind"
    for name, get in (("beginning-of-text", L.llama_vocab_bos), ("end-of-text", L.llama_vocab_eos)):
        if get(target) != get(draft):
            return f"its {name} token is {get(draft)}, the model's is {get(target)}"
    if bool(L.llama_vocab_get_add_bos(target)) != bool(L.llama_vocab_get_add_bos(draft)):
        return "one adds a beginning-of-text token to prompts and the other does not"
    sizes = L.llama_vocab_n_tokens(target), L.llama_vocab_n_tokens(draft)
    if abs(sizes[0] - sizes[1]) > VOCAB_SIZE_DIFFERENCE:
        return f"its vocabulary has {sizes[1]} tokens, the model's {sizes[0]}"
    for token in range(min(sizes)):
        mine, theirs = L.llama_vocab_get_text(target, token), L.llama_vocab_get_text(draft, token)
        if mine != theirs:
            return (f"token {token} is {theirs.decode('utf-8', 'replace')!r} in its vocabulary and "
                    f"{mine.decode('utf-8', 'replace')!r} in the model's")
    return ""
