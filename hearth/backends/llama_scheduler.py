"""Continuous batching for llama.cpp: one decode step serves every active sequence; newcomers join between steps.

One thread owns the llama.cpp context. Each step it builds a single `llama_batch` holding the next token of every
generating sequence plus a chunk of one or more waiting prompts (so running streams keep flowing while a long
prompt is read), calls `llama_decode` once, then samples each sequence with its own sampler chain, in C. Request
threads only tokenize, submit a job and read its chunks from a queue.

Prompt cache: a finished sequence keeps its KV entries in its slot. A new prompt reuses the longest prefix any slot
holds (a chat that goes on, a shared system prompt), copied into the slot it runs in when it sits elsewhere; only
the rest is computed. Images count as part of the prefix (known by their bytes), so a vision chat that goes on
neither encodes its images again nor reads its history again.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import llama_cpp.llama_cpp as L
import llama_cpp.mtmd_cpp as M
import numpy as np

from hearth.backends.base import GenerationChunk, StopBuffer, TokenLogprob
from hearth.backends.llama_speculative import DraftModel, NgramIndex
from hearth.config.speculation import Speculation
from hearth.cores import Share
from hearth.errors import BackendError, HearthError, Overloaded

log = logging.getLogger("hearth.runner.llama")

# Copy a busy slot's prefix into a free one only when it saves at least this many tokens of prompt processing.
MIN_COPIED_PREFIX = 32
FIRST_GUESS = 4  # tokens a sequence guesses at first (and after a miss, at least), up to its spec_n_max
# A draft model reads a prompt about 10 times as fast as the target generates (0.5B reading, 1.5B generating, on
# 2 cores), and its guesses save at most about half the target's steps: reading more than this many tokens per token
# the sequence may still generate costs more than guessing can give back (the last of several streams, left alone
# near its end, would read its whole prompt into the draft for a few tokens).
READ_PER_TOKEN_LEFT = 4
CATCH_UP = 8  # a step whose draft model first read more tokens than this (after a rest) says nothing of guessing
PROMPT_CHUNK_WHILE_GENERATING = 256
STREAM_SPREAD = 4  # with N sequences generating, streamed text goes out at most every min(N, 4) stream intervals
HANDOVER_WAIT = 0.005  # seconds the decode thread waits at most for an event loop to take text, between two steps


@dataclass
class MediaImage:
    """One image chunk of a prompt: where its embedding positions start in the prompt's token list, how many there
    are, and how many positions they take (M-RoPE models fit an image in fewer positions than tokens)."""

    start: int
    chunk: Any  # the mtmd_input_chunk, owned by its Media's chunk list
    n_tokens: int
    n_pos: int

    @property
    def end(self) -> int:
        return self.start + self.n_tokens


class Media:
    """A prompt with images, as llama.cpp's multimodal helper cut it: its chunk list, and its token list in which
    each image chunk stands as a run of one negative id, derived from the image's bytes and its place (so a prompt
    that repeats an earlier one's images, a vision chat that goes on, shares that prefix with it and reuses its
    cache, while another image never matches)."""

    def __init__(self) -> None:
        self.chunks: Any = None
        self.tokens: list[int] = []
        self.images: list[MediaImage] = []

    def positions_before(self, index: int) -> int:
        """Positions taken by the first `index` tokens (a cut never falls inside an image)."""
        return index + sum(image.n_pos - image.n_tokens for image in self.images if image.end <= index)

    def cut(self, index: int) -> int:
        """`index`, moved back to the start of the image it falls inside, if any: an image is evaluated whole."""
        for image in self.images:
            if image.start < index < image.end:
                return image.start
        return index

    def close(self) -> None:
        if self.chunks:
            M.mtmd_input_chunks_free(self.chunks)
            self.chunks = None
        self.images = []

    def __del__(self) -> None:
        self.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two lists share from the start. Slices are compared in C, halving the span: a few
    microseconds for prompts of thousands of tokens, which admission compares against every slot."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def runs(seqs: Iterable[int]) -> int:
    """How many runs of consecutive sequence ids a set of them makes."""
    ordered = sorted(set(seqs))
    return sum(1 for i, seq in enumerate(ordered) if i == 0 or seq != ordered[i - 1] + 1)


def choose_slots(busy: Iterable[int], free: list[tuple[int, list[int]]], prompts: list[list[int]]) -> list[int]:
    """The free slots (sequence ids) for jobs admitted together, in their order, given each free slot's cached
    tokens (`free`, lowest sequence first) and each job's prompt.

    With a KV stream per sequence, llama.cpp decodes a batch in one pass per run of consecutive sequence ids
    (llama_batch_allocr::split_equal, sequential), so the busy slots are kept in as few runs as possible: each job
    in turn takes the free slot that leaves the fewest runs, among those the one holding most of its prompt, then
    the lowest. Then the jobs swap the slots so chosen among themselves, each taking the one holding most of its
    prompt: requests that come back together find their own caches.
    """
    taken = set(busy)
    count = runs(taken)

    def runs_with(seq: int) -> int:  # the runs once `seq` is taken too: it joins, bridges or starts one
        return count + 1 - (seq - 1 in taken) - (seq + 1 in taken)

    left = list(free)
    chosen: list[tuple[int, list[int]]] = []
    for prompt in prompts[:len(free)]:
        best = min(left, key=lambda slot: (runs_with(slot[0]), -common_prefix(slot[1], prompt), slot[0]))
        count = runs_with(best[0])
        left.remove(best)
        taken.add(best[0])
        chosen.append(best)
    result = []
    for prompt in prompts[:len(chosen)]:
        best = min(chosen, key=lambda slot: (-common_prefix(slot[1], prompt), slot[0]))
        chosen.remove(best)
        result.append(best[0])
    return result


class Payoff:
    """Whether guessing pays here, judged by what it yields: each step with guesses against what a step without
    costs (a moving average in seconds per token, apart for each number of sequences generating). Checking guesses
    costs what the machine makes it cost (on 2 cores, checking 4 guessed tokens of Qwen2.5-Coder 1.5B besides the
    next takes 3.6 times as long as the next alone, 48 guessed 18 times, where a GPU takes about as long), and a
    draft model costs its own steps. What plain steps cost is the model's (this object's); whether guessing pays is
    each sequence's own (`Balance`, on its slot), since it depends on the text: a code edit that repeats its prompt
    pays where the prose before it did not. Steps without guesses are taken now and then (the first PLAIN, then one
    every REFRESH) to know what plain steps cost."""

    WEIGHT = 0.25  # of the newest plain step in its average
    PLAIN = 2
    REFRESH = 256

    def __init__(self) -> None:
        self.plain: dict[int, float] = {}
        self.plain_steps: dict[int, int] = {}
        self.since_plain: dict[int, int] = {}

    def allows(self, generating: int) -> bool:
        return self.plain_steps.get(generating, 0) >= self.PLAIN and self.since_plain.get(generating, 0) < self.REFRESH

    def record(self, generating: int, balances: list[Balance], seconds: float, tokens: int) -> None:
        """A step of generation alone took `seconds` for `tokens`; `balances`: those of the sequences that guessed
        in it (none: a plain step)."""
        if tokens <= 0:
            return
        if not balances:
            old = self.plain.get(generating)
            self.plain[generating] = seconds / tokens if old is None else old + self.WEIGHT * (seconds / tokens - old)
            self.plain_steps[generating] = self.plain_steps.get(generating, 0) + 1
            self.since_plain[generating] = 0
            return
        self.since_plain[generating] = self.since_plain.get(generating, 0) + 1
        plain = self.plain.get(generating)
        if plain:
            for balance in balances:
                balance.record(tokens - seconds / plain)


class Balance:
    """One sequence's account of what guessing gained it, in plain steps: each step with guesses adds the tokens it
    gave less what it cost (its time over a plain step's), up to CREDIT. A code edit's long guesses, kept, gain
    about 30 a step, and one missed at a renamed word costs 8-18, which such a sequence can pay; a text that stops
    repeating its prompt soon spends its credit. Guessing goes on while the account holds more than -DEBT (a code
    edit's first miss may come at its first renamed word, before it gained anything); below that the sequence
    rests from it for REST steps, twice as many each time it runs into debt again before it has gained a full
    credit (up to MAX_REST), then tries anew with an even account: the text may come to repeat its prompt, the
    machine may get quieter. Prose whose guesses miss loses at most DEBT plain steps per try."""

    CREDIT = 32.0
    DEBT = 12.0
    REST = 16
    MAX_REST = 1024

    def __init__(self) -> None:
        self.balance = 0.0
        self.resting = 0
        self.rest = self.REST

    def allows(self) -> bool:
        """Whether the sequence guesses this step (a step it does not counts toward its rest)."""
        if self.resting > 0:
            self.resting -= 1
            return False
        return True

    def record(self, gained: float) -> None:
        self.balance = min(self.CREDIT, self.balance + gained)
        if self.balance >= self.CREDIT:
            self.rest = self.REST
        elif self.balance < -self.DEBT:
            self.resting, self.rest = self.rest, min(self.MAX_REST, self.rest * 2)
            self.balance = 0.0


@dataclass
class Job:
    """One generation request as the scheduler sees it."""

    tokens: list[int]
    max_tokens: int
    stops: list[str]
    ignore_eos: bool
    # Returns (sampler chain, grammar sampler or None): llama_sampler pointers the slot owns while it runs.
    make_sampler: Callable[[], tuple[Any, Any]]
    request_id: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    # Set for a reader on an event loop: the scheduler hands it each step's output in one call to the loop.
    loop: asyncio.AbstractEventLoop | None = None
    aqueue: asyncio.Queue | None = None
    media: Media | None = None  # set when the prompt has images: each evaluated by llama.cpp's multimodal helper
    speculation: Speculation | None = None  # how its tokens are guessed (llama_speculative.py), if they are
    delivered: bool = False  # its first output is on its way to the reader (that one is never held back)

    async def achunks(self) -> AsyncIterator[GenerationChunk]:
        """Chunks for a reader on the event loop; leaving early (cancellation) frees the slot."""
        assert self.aqueue is not None
        try:
            while True:
                item = await self.aqueue.get()
                while not isinstance(item, BaseException) and not item.finish_reason and not self.aqueue.empty():
                    following = self.aqueue.get_nowait()
                    if isinstance(following, BaseException) or following.finish_reason:
                        yield item
                        item = following
                        break
                    item = GenerationChunk(text=item.text + following.text,
                                           token_count=item.token_count + following.token_count,
                                           logprobs=item.logprobs + following.logprobs,
                                           prompt_tokens=item.prompt_tokens, cached_tokens=item.cached_tokens)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            self.cancelled = True

    def chunks(self, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        """Chunks as the scheduler produces them; stops (and frees the slot) when `cancelled()` turns true."""
        try:
            while True:
                try:
                    item = self.out.get(timeout=0.05)
                except queue.Empty:
                    if cancelled():
                        self.cancelled = True
                        return
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
                if cancelled():
                    self.cancelled = True
                    return
        finally:
            self.cancelled = True  # no-op once finished; frees the slot if the reader left early


@dataclass
class Slot:
    """A sequence id in the KV cache, the tokens it holds, and the job using it (if any)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    job: Job | None = None
    pending: list[int] = field(default_factory=list)
    sampler: Any = None
    grammar: Any = None
    greedy: bool = False  # the chain is llama.cpp's greedy sampler alone: the token is the logits' argmax
    next_token: int = -1
    batch_index: int = -1
    produced: int = 0
    limit: int = 0
    cached: int = 0
    decoder: Any = None
    stops: StopBuffer | None = None
    last_used: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    media: Media | None = None  # the job's images, kept until the last of them is evaluated
    images: list[MediaImage] = field(default_factory=list)  # those still to evaluate, in prompt order
    pos_delta: int = 0  # positions minus tokens held (images can take fewer positions than tokens)
    drafted: list[int] = field(default_factory=list)  # guesses in this step's batch after next_token
    speculation: Speculation | None = None  # the job's
    ngram: NgramIndex | None = None  # ngram-simple speculation: where the job's runs of tokens occurred
    draft_n: int = 0  # tokens guessed for the job so far, and those the model agreed with
    draft_accepted: int = 0
    draft_len: int = 0  # tokens it may guess next: doubled while all are kept, cut back after a miss
    balance: Balance = field(default_factory=Balance)  # whether guessing pays for the job's text

    @property
    def busy(self) -> bool:
        return self.job is not None


class Scheduler:
    """Owns the context; runs the decode loop in its own thread."""

    def __init__(self, ctx: Any, vocab: Any, *, n_parallel: int, n_ctx_seq: int, n_batch: int, queue_size: int,
                 piece: Callable[[int, Any], bytes], n_vocab: int, mtmd: Any = None,
                 stream_interval: float = 0.0, share: Share | None = None,
                 drafter: DraftModel | None = None) -> None:
        self.ctx = ctx
        # Guessed tokens are checked in each step (llama_speculative.py), for the jobs that guess: from the sequence
        # itself, or from this draft model.
        self.drafter = drafter
        self.payoff = Payoff()
        # The threads each step computes with: fewer while other runners of the server work too (hearth/cores.py).
        self.share = share
        self.threads = L.llama_n_threads(ctx)
        self.mtmd = mtmd
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.memory = L.llama_get_memory(ctx)
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self.queue_size = queue_size
        self.piece = piece
        self.slots = [Slot(seq=i) for i in range(n_parallel)]
        # The slots holding a job, in sequence order: what each step walks (the decode thread alone changes it).
        self.active: list[Slot] = []
        self.waiting: deque[Job] = deque()
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self._cond = threading.Condition()
        self._closing = False
        self._piece_buffer = ctypes.create_string_buffer(256)
        # Each token's text and whether it ends generation, asked of llama.cpp once per token id: two calls into C
        # per token cost more than the argmax that picks it.
        self._tokens: dict[int, tuple[bytes, bool]] = {}
        # NumPy views of logits rows by address: building one costs more than the argmax over it right after a
        # decode (the interpreter's caches are cold then), and llama.cpp hands out the same few rows every step.
        self._logits_at = _LOGITS_ADDRESS(ctypes.cast(L.llama_get_logits_ith, ctypes.c_void_p).value)
        self._views: dict[int, np.ndarray] = {}
        self._pumps: dict[asyncio.AbstractEventLoop, Pump] = {}
        self._to_wake: set[Pump] = set()
        self.handover_wait = HANDOVER_WAIT
        # Readers on an event loop get text at most this often (seconds): each delivery wakes threads in this
        # process and the API's, and on a machine whose cores all decode, that costs the decode loop speed.
        self.stream_interval = stream_interval
        # Candidate arrays for sampling by hand (sequences with a grammar), laid out as llama_token_data.
        token_data = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert token_data.itemsize == ctypes.sizeof(L.llama_token_data)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=token_data)
        self._one = np.zeros(1, dtype=token_data)
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    # -- request side ----------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self.waiting) >= self.queue_size and len(self.active) == len(self.slots):
                raise Overloaded(
                    f"all {len(self.slots)} sequences of this model are busy and {len(self.waiting)} requests are "
                    f"already waiting; try again shortly", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self._cond.notify()
        return job

    def in_flight(self) -> int:
        """Jobs waiting or generating (the list of generating slots is `active`)."""
        with self._cond:
            return len(self.waiting) + len(self.active)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for slot in self.slots:
            _free_samplers(slot)
        L.llama_batch_free(self.batch)

    # -- the loop --------------------------------------------------------------------------------------

    def delivery_interval(self) -> float:
        """How often a loop's readers get their text (seconds). Each delivery costs about the same whatever it
        carries, so with several sequences generating each stream's interval grows with their number (up to
        STREAM_SPREAD times): the deliveries a second stay about as many as for one stream, instead of taking ever
        more of the cores from the decode loop."""
        return self.stream_interval * min(max(len(self.active), 1), STREAM_SPREAD)

    def _emit(self, job: Job, item: Any) -> None:
        if job.loop is None:
            job.out.put(item)
            return
        pump = self._pumps.get(job.loop)
        if pump is None:
            for loop in [loop for loop in self._pumps if loop.is_closed()]:
                del self._pumps[loop]
            pump = self._pumps[job.loop] = Pump(job.loop)
        pump.items.append((job, item))
        # A job's first text, its end and errors go out after this step; other text when its loop's interval is up.
        if not job.delivered or isinstance(item, BaseException) or item.finish_reason:
            self._to_wake.add(pump)
        job.delivered = True

    def _flush(self) -> None:
        """Between two steps, hand text over to the event loops it is for: those with urgent text, those whose
        delivery interval is up, and all with text waiting when the next step may be long (it admits a request, or
        reads a prompt or an image). Each loop is woken once, and the decode thread waits (briefly) until the loops
        have handed the text to their readers before it decodes on. Their work then runs while llama.cpp's
        threads are idle: woken mid-step, a loop's thread would take a core from one of them, and the others would
        wait for it at the next barrier, which costs more decoding than the loop's own work (benchmarks/README.md).
        """
        if self._pumps:
            now = time.perf_counter()
            long_step = None
            for pump in self._pumps.values():
                if not pump.items or pump in self._to_wake:
                    continue
                if now < pump.due:
                    if long_step is None:
                        long_step = bool(self.waiting) or any(s.pending or s.images for s in self.active)
                    if not long_step:
                        continue
                self._to_wake.add(pump)
        if not self._to_wake:
            return
        due = time.perf_counter() + self.delivery_interval()
        woken = []
        for pump in self._to_wake:
            pump.due = due
            pump.taken.clear()
            try:
                pump.loop.call_soon_threadsafe(pump.take)
            except RuntimeError:  # that loop is closed: its readers are gone, and so is the text for them
                pump.items.clear()
                continue
            woken.append(pump)
        self._to_wake.clear()
        for pump in woken:
            pump.taken.wait(self.handover_wait)

    def _run(self) -> None:
        while True:
            # The lock is taken only when there is something to admit, to close or to wait for: a step that just
            # goes on generating skips it (a job submitted meanwhile is seen at the next step).
            if self.waiting or self._closing or not self.active:
                with self._cond:
                    while not self._closing and not self.waiting and not self.active:
                        self._cond.wait()
                    closing = self._closing
                    if closing:
                        for job in [*self.waiting, *(s.job for s in self.active if s.job)]:
                            self._emit(job, BackendError("the model is being unloaded"))
                    else:
                        self._admit()
                if closing:
                    self._flush()  # without the lock: a loop submitting meanwhile is not held up by the handover
                    return
            if self.share is not None:
                self._take_share()
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the jobs in it, never the loop
                log.exception("decode step failed")
                for slot in list(self.active):
                    if slot.job is not None:
                        self._finish(slot, error=exc if isinstance(exc, HearthError) else
                                     BackendError(f"llama.cpp failed: {exc}"))
            self._flush()

    def _take_share(self) -> None:
        threads = self.share.threads()
        if threads != self.threads:
            L.llama_set_n_threads(self.ctx, threads, threads)
            if self.drafter is not None:
                self.drafter.set_threads(threads)
            log.debug("computing with %d of %d threads (busy runners: %d)", threads, self.share.configured,
                      self.share.board.busy() if self.share.board else 1)
            self.threads = threads

    def _admit(self) -> None:
        """Give waiting jobs free slots, first come first served, reusing cached prefixes.

        Busy slots are kept together (`choose_slots`): llama.cpp decodes each run of consecutive sequences in a
        pass of its own, and computes attention over the span of KV streams from the lowest to the highest sequence
        in a pass. Idle slots keep their entries as a cache, and a job takes the slot holding most of its prompt
        among those that keep the busy slots together; when another slot holds a longer prefix of the new prompt,
        that slot's stream is copied in.
        """
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            # Planned with the jobs that can be admitted with this one, so that they find their own caches too.
            together = [j.tokens for j in itertools.islice((j for j in self.waiting if not j.cancelled), len(free))]
            seq = choose_slots((s.seq for s in self.slots if s.busy), [(s.seq, s.tokens) for s in free], together)[0]
            target = self.slots[seq]
            reuse = common_prefix(target.tokens, job.tokens)
            if self._prefix_in_progress(job, reuse):
                return  # its prefix is being computed in another slot right now: wait a step or two, then copy it
            self.waiting.popleft()
            source = max((s for s in self.slots if s is not target), default=None,
                         key=lambda s: common_prefix(s.tokens, job.tokens))
            if source is not None:
                shared = common_prefix(source.tokens, job.tokens)
                if shared >= MIN_COPIED_PREFIX and shared > reuse + MIN_COPIED_PREFIX:
                    L.llama_memory_seq_cp(self.memory, source.seq, target.seq, -1, -1)
                    target.tokens = list(source.tokens)
                    reuse = shared
            try:
                self._start(target, job, reuse)
            except Exception as exc:  # fails this request, never the loop (which would leave every reader waiting)
                log.exception("could not start a request")
                error = BackendError(f"llama.cpp failed: {exc}")
                if target.job is job:
                    self._finish(target, error=error)
                else:  # it may have stopped between trimming the slot's cache and noting what the cache holds
                    L.llama_memory_seq_rm(self.memory, target.seq, 0, -1)
                    target.tokens = []
                    self._emit(job, error)

    def _prefix_in_progress(self, job: Job, have: int) -> bool:
        """Whether a busy slot is still reading a prompt that shares a long prefix with this job's.

        The choices of an `n > 1` request (or users sharing a system prompt) arrive together: rather than compute
        the same prompt in several slots at once, the later ones wait until the first has it, then copy it.
        """
        for slot in self.slots:
            if slot.job is not None and (slot.pending or slot.images):
                shared = common_prefix(slot.job.tokens, job.tokens)
                if shared >= MIN_COPIED_PREFIX and shared > have + MIN_COPIED_PREFIX:
                    return True
        return False

    def _start(self, slot: Slot, job: Job, reuse: int) -> None:
        try:
            sampler, grammar = job.make_sampler()
        except Exception as exc:  # refused before it ever held the slot
            self._emit(job, exc if isinstance(exc, HearthError) else BackendError(f"llama.cpp failed: {exc}"))
            return
        reuse = min(reuse, len(job.tokens) - 1)  # the last prompt token is always decoded, for its logits
        media = job.media
        if media is not None:
            reuse = media.cut(reuse)
            slot.pos_delta = media.positions_before(reuse) - reuse
            slot.images = [image for image in media.images if image.start >= reuse]
            slot.media = media if slot.images else None
            if slot.media is None:
                media.close()
        else:
            slot.pos_delta = 0
        L.llama_memory_seq_rm(self.memory, slot.seq, reuse + slot.pos_delta, -1)
        slot.tokens = job.tokens[:reuse]
        slot.pending = self._text_from(job, slot.images, reuse)
        slot.job = job
        slot.sampler, slot.grammar = sampler, grammar
        slot.greedy = grammar is None and _greedy_only(sampler)
        slot.next_token = -1
        slot.produced = 0
        slot.cached = reuse
        slot.limit = job.max_tokens or (self.n_ctx_seq - len(job.tokens))
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.stops = StopBuffer(job.stops)
        slot.drafted = []
        slot.draft_n = slot.draft_accepted = 0
        speculation = slot.speculation = job.speculation
        slot.ngram = NgramIndex(speculation.ngram) if speculation and speculation.lookup else None
        slot.draft_len = min(FIRST_GUESS, speculation.n_max) if speculation else 0
        slot.balance = Balance()
        slot.admitted = time.perf_counter()
        self.active.append(slot)
        self.active.sort(key=lambda s: s.seq)

    def _step(self) -> None:
        batch = self.batch
        n = 0
        for slot in list(self.active):
            slot.batch_index = -1
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot, cancelled=True)
        for slot in list(self.active):
            while slot.job is not None and not slot.pending and slot.images:
                self._evaluate_image(slot)
        # Generating sequences read one token each; prompts, in admission order, as much as fits this step, in
        # smaller bites while others are generating, so that their tokens keep coming while a long prompt is read.
        generating = sum(1 for slot in self.active if not slot.pending and slot.next_token >= 0)
        budget = self.n_batch if generating == 0 else min(self.n_batch, generating + PROMPT_CHUNK_WHILE_GENERATING)
        room = budget - generating
        started, guessing = time.perf_counter(), []
        if generating and any(slot.speculation is not None for slot in self.active) and self.payoff.allows(generating):
            guessing = self._guess(generating, self.n_batch - budget)
        chunks: dict[int, list[int]] = {}
        reading = [s for s in self.active if s.pending]
        if len(reading) > 1:
            reading.sort(key=lambda s: s.admitted)
        for slot in reading:
            if room <= 0:
                break
            chunks[slot.seq], slot.pending = slot.pending[:room], slot.pending[room:]
            room -= len(chunks[slot.seq])
        # Into the batch in sequence order (`active` is kept so): llama.cpp decodes in one pass only consecutive
        # sequences met in increasing order in the batch, so another order would cost passes over the weights.
        for slot in self.active:
            chunk = chunks.get(slot.seq)
            if chunk is None:
                if slot.pending or slot.next_token < 0:
                    continue
                chunk = [slot.next_token]
                last = True
            else:
                last = not slot.pending and not slot.images
            for token in chunk:
                self._add(batch, n, token, len(slot.tokens) + slot.pos_delta, slot.seq, False)
                slot.tokens.append(token)
                n += 1
            if last:
                batch.logits[n - 1] = True
                slot.batch_index = n - 1
            for token in slot.drafted:  # checked in this same pass: each guess's logits tell whether it was right
                self._add(batch, n, token, len(slot.tokens) + slot.pos_delta, slot.seq, True)
                slot.tokens.append(token)
                n += 1
        if n == 0:
            return
        batch.n_tokens = n
        result = L.llama_decode(self.ctx, batch)
        if result != 0:
            raise BackendError(f"llama_decode failed with code {result}")
        sampled = [slot for slot in self.active if slot.batch_index >= 0]
        before = sum(slot.produced for slot in sampled)
        for slot in sampled:
            if slot.drafted:
                self._check_guesses(slot)
            else:
                self._sample(slot)
        if (not chunks and generating and any(slot.speculation is not None for slot in sampled)
                and not (self.drafter is not None and self.drafter.caught_up > CATCH_UP)):
            # A step of generation alone: what guessing yields here, against steps without.
            self.payoff.record(generating, guessing, time.perf_counter() - started,
                               sum(slot.produced for slot in sampled) - before)

    def _guess(self, generating: int, space: int) -> list[Balance]:
        """Guesses for the generating sequences whose jobs guess, while the batch is small enough for that to pay, as
        many as each may still use and `space` more tokens in the batch allow (`slot.drafted`); the balances of the
        sequences whose guessing cost this step anything (a draft model ran for them, or their guess went into the
        batch)."""
        wanted: dict[int, tuple[list[int], int]] = {}
        room: dict[int, int] = {}
        p_min = 0.0
        for slot in self.active:
            speculation = slot.speculation
            if (speculation is None or generating > speculation.max_batch or slot.pending or slot.next_token < 0
                    or slot.job is None or slot.job.media is not None or not slot.balance.allows()):
                continue
            room[slot.seq] = min(slot.draft_len, slot.limit - slot.produced - 1, self.n_ctx_seq - len(slot.tokens) - 2,
                                 space)
            if room[slot.seq] < max(speculation.n_min, 1):
                continue
            space -= room[slot.seq]
            if slot.ngram is not None:  # lookup first: its guesses cost nothing to make (llama.cpp's order too)
                slot.drafted = slot.ngram.guess(slot.tokens, slot.next_token, room[slot.seq])
            if (not slot.drafted and speculation.drafts and self.drafter is not None
                    and self.drafter.behind(slot.seq, len(slot.tokens)) <= READ_PER_TOKEN_LEFT * (slot.limit
                                                                                                 - slot.produced)):
                room[slot.seq] = min(room[slot.seq], speculation.draft_n_max)
                wanted[slot.seq] = (slot.tokens, slot.next_token)
                p_min = max(p_min, speculation.p_min)
        if wanted and self.drafter is not None:
            try:
                found = self.drafter.guess(wanted, max(room[seq] for seq in wanted), p_min)
            except RuntimeError as exc:  # the step goes on without guesses
                log.warning("%s", exc)
                found = {}
            for seq, tokens in found.items():
                self.slots[seq].drafted = tokens[:room[seq]]
        for slot in self.active:
            if slot.drafted and slot.speculation is not None and len(slot.drafted) < slot.speculation.n_min:
                slot.drafted = []
            slot.draft_n += len(slot.drafted)
        return [slot.balance for slot in self.active
                if slot.drafted or (self.drafter is not None and slot.seq in wanted)]

    def _check_guesses(self, slot: Slot) -> None:
        """Sample each position of the slot's guesses in turn, as without speculation; keep the guesses up to the
        first the sampler did not pick (whose sampled token comes next instead), and cut the rest from the KV
        cache."""
        drafted, slot.drafted = slot.drafted, []
        kept = 0
        for i in range(len(drafted) + 1):
            token = self._pick(slot, slot.batch_index + i)
            right = i < len(drafted) and token == drafted[i]
            slot.draft_accepted += right  # (before the token may end the job, whose last chunk counts it)
            if not self._take(slot, token, slot.batch_index + i):
                break
            if right:
                kept += 1
                continue
            slot.next_token = token
            break
        speculation = slot.speculation
        if speculation is not None:  # a checked guess costs a token of the step: guess long only while it pays
            slot.draft_len = (min(speculation.n_max, 2 * slot.draft_len) if kept == len(drafted)
                              else min(speculation.n_max, max(FIRST_GUESS, kept + 1)))
        cut = len(drafted) - kept
        if cut:
            del slot.tokens[len(slot.tokens) - cut:]
            if slot.ngram is not None:
                slot.ngram.cut(len(slot.tokens))
            if not L.llama_memory_seq_rm(self.memory, slot.seq, len(slot.tokens) + slot.pos_delta, -1):
                raise BackendError("llama.cpp could not remove rejected guesses from the KV cache")

    @staticmethod
    def _text_from(job: Job, images: list[MediaImage], index: int) -> list[int]:
        """The job's prompt tokens from `index` up to the next of its `images` (or its end)."""
        return job.tokens[index:images[0].start if images else None]

    def _evaluate_image(self, slot: Slot) -> None:
        """The slot's next image, which its prompt has reached: encoded by the projector, then its embeddings
        decoded into the slot's sequence by llama.cpp's multimodal helper. The other sequences wait meanwhile; the
        text around images is read like any prompt, in the shared batch."""
        image, job = slot.images.pop(0), slot.job
        assert job is not None and image.start == len(slot.tokens)
        position = L.llama_pos(0)
        result = M.mtmd_helper_eval_chunk_single(self.mtmd, self.ctx, image.chunk, len(slot.tokens) + slot.pos_delta,
                                                 slot.seq, self.n_batch, False, ctypes.byref(position))
        if result != 0:
            self._finish(slot, error=BackendError(f"llama.cpp could not evaluate the prompt's images (code {result})"))
            return
        slot.tokens.extend(job.tokens[image.start:image.end])
        slot.pos_delta = position.value - len(slot.tokens)
        if not slot.images and slot.media is not None:
            slot.media.close()
            slot.media = None
        slot.pending = self._text_from(job, slot.images, len(slot.tokens))

    def _logits(self, index: int) -> np.ndarray:
        """The logits of batch position `index` (negative: from the last output), read in place: valid until the
        next decode."""
        address = self._logits_at(self.ctx, index)
        if not address:
            raise BackendError(f"llama.cpp holds no logits for batch position {index}")
        view = self._views.get(address)
        if view is None:
            if len(self._views) >= 4 * len(self.slots) + 16:  # the output buffer moved: forget the old rows
                self._views.clear()
            view = self._views[address] = np.ctypeslib.as_array(
                ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        return view

    @staticmethod
    def _add(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _sample(self, slot: Slot) -> None:
        token = self._pick(slot, slot.batch_index)
        if self._take(slot, token, slot.batch_index):
            slot.next_token = token

    def _pick(self, slot: Slot, index: int) -> int:
        """The token the slot's sampler picks from batch position `index`'s logits."""
        if slot.greedy:
            # What llama.cpp's greedy sampler selects (the first highest logit), read in place: llama_sampler_sample
            # would first copy the whole vocabulary into candidates (160 µs a token for a 150k vocabulary, 280 µs
            # for Gemma's 262k, against 15-25 µs here), while the machine's other cores wait for the next step.
            return int(self._logits(index).argmax())
        if slot.grammar is None:
            return L.llama_sampler_sample(slot.sampler, self.ctx, index)
        return self._sample_with_grammar(slot, index)

    def _take(self, slot: Slot, token: int, index: int) -> bool:
        """A sampled token into the job's output (or its end); whether the job goes on."""
        job = slot.job
        assert job is not None and slot.stops is not None
        if slot.produced == 0:
            slot.first_token = time.perf_counter()
        piece, end = self._tokens.get(token) or self._learn(token)
        if end and not job.ignore_eos:
            self._finish(slot, reason="stop")
            return False
        slot.produced += 1
        text, hit = slot.stops.push(slot.decoder.decode(piece))
        if job.logprobs:
            self._emit(job, GenerationChunk(text=text, token_count=1,
                                            logprobs=[self._logprob(index, token, piece, job.top_logprobs)],
                                            **self._prompt_counts(slot)))
        elif text or slot.produced == 1:
            self._emit(job, GenerationChunk(text=text, token_count=1, **self._prompt_counts(slot)))
        if hit:
            self._finish(slot, reason="stop", flush=False)
        elif slot.produced >= slot.limit or len(slot.tokens) + 1 > self.n_ctx_seq:
            self._finish(slot, reason="length")
        else:
            return True
        return False

    @staticmethod
    def _prompt_counts(slot: Slot) -> dict[str, int]:
        """On the first token's chunk only: the prompt's length and the part of it the cache held (the API can say
        so before the end, as Anthropic's message_start does)."""
        if slot.produced != 1 or slot.job is None:
            return {}
        return {"prompt_tokens": len(slot.job.tokens), "cached_tokens": slot.cached}

    def _learn(self, token: int) -> tuple[bytes, bool]:
        known = self._tokens[token] = (self.piece(token, self._piece_buffer),
                                       bool(L.llama_vocab_is_eog(self.vocab, token)))
        return known

    def _sample_with_grammar(self, slot: Slot, index: int) -> int:
        """Sample as usual, then ask the grammar about that one token; only when it refuses is the grammar run over
        the whole vocabulary and the token sampled again (as llama.cpp's own server does: checking every token
        of a 150k vocabulary against a grammar each step would cost more than the decode)."""
        logits = self._logits(index)
        token = self._apply(slot.sampler, logits, None)
        one = self._one
        one["id"], one["logit"], one["p"] = token, 1.0, 0.0
        single = L.llama_token_data_array(data=one.ctypes.data_as(L.llama_token_data_p), size=1, selected=-1,
                                          sorted=False)
        L.llama_sampler_apply(slot.grammar, ctypes.byref(single))
        if not np.isfinite(one["logit"][0]):
            token = self._apply(slot.sampler, logits, slot.grammar)
        L.llama_sampler_accept(slot.grammar, token)
        L.llama_sampler_accept(slot.sampler, token)
        return token

    def _apply(self, chain: Any, logits: np.ndarray, grammar: Any) -> int:
        """Run samplers over all candidates (the grammar first, if given); returns the token they select."""
        candidates = self._candidates
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = L.llama_token_data_array(data=candidates.ctypes.data_as(L.llama_token_data_p), size=self.n_vocab,
                                         selected=-1, sorted=False)
        if grammar is not None:
            L.llama_sampler_apply(grammar, ctypes.byref(array))
        L.llama_sampler_apply(chain, ctypes.byref(array))
        if array.selected < 0:
            raise BackendError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _logprob(self, index: int, token: int, piece: bytes, top: int) -> TokenLogprob:
        """The token's log probability under the model's own distribution (before sampling changes it)."""
        logits = self._logits(index)
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        alternatives = []
        if top > 0:
            best = np.argpartition(logits, -top)[-top:]
            for alt in sorted(best.tolist(), key=lambda t: -logits[t]):
                alt_piece = (self._tokens.get(alt) or self._learn(alt))[0]
                alternatives.append(TokenLogprob(token=alt, text=alt_piece.decode("utf-8", errors="replace"),
                                                 logprob=float(logits[alt]) - log_total, bytes=alt_piece))
        return TokenLogprob(token=token, text=piece.decode("utf-8", errors="replace"),
                            logprob=float(logits[token]) - log_total, bytes=piece, top=alternatives)

    def _finish(self, slot: Slot, *, reason: str = "", cancelled: bool = False, flush: bool = True,
                error: BaseException | None = None) -> None:
        job = slot.job
        assert job is not None and slot.stops is not None
        if error is not None:
            self._emit(job, error)
            L.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
            slot.tokens = []
        elif not cancelled:
            if flush:
                rest, hit = slot.stops.push(slot.decoder.decode(b"", final=True))
                tail = rest if hit else rest + slot.stops.flush()
                if tail:
                    self._emit(job, GenerationChunk(text=tail))
            now = time.perf_counter()
            first = slot.first_token or now
            self._emit(job, GenerationChunk(
                finish_reason=reason, prompt_tokens=len(job.tokens), completion_tokens=slot.produced,
                stop_sequence=slot.stops.matched,
                cached_tokens=slot.cached, prompt_ms=(first - slot.admitted) * 1000,
                predicted_ms=(now - first) * 1000 if slot.produced else 0.0,
                draft_n=slot.draft_n, draft_accepted=slot.draft_accepted))
        _free_samplers(slot)
        if slot.media is not None:
            slot.media.close()
            slot.media = None
        slot.images = []
        slot.job = None
        slot.pending = []
        slot.first_token = 0.0
        if slot in self.active:
            self.active.remove(slot)
        slot.last_used = time.perf_counter()


# llama_get_logits_ith, answering the row's address as an int (llama-cpp-python's binding answers a ctypes pointer).
_LOGITS_ADDRESS = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)


def _greedy_only(chain: Any) -> bool:
    """Whether a sampler chain is llama.cpp's greedy sampler and nothing else (no bias, penalties or grammar)."""
    return L.llama_sampler_chain_n(chain) == 1 and L.llama_sampler_name(L.llama_sampler_chain_get(chain, 0)) == b"greedy"


def _free_samplers(slot: Slot) -> None:
    for name in ("sampler", "grammar"):
        pointer = getattr(slot, name)
        if pointer is not None:
            L.llama_sampler_free(pointer)
            setattr(slot, name, None)


class Pump:
    """Output on its way to the readers on one event loop. The decode thread appends to it, and between two steps
    wakes the loop to take it (`Scheduler._flush`) and waits until the loop has handed it to its readers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[Job, Any]] = deque()  # appended by the decode thread, taken by the loop
        self.due = 0.0  # when the next delivery of mid-stream text is due (time.perf_counter)
        self.taken = threading.Event()  # set by the loop once the readers have run with what it took

    def take(self) -> None:
        """On the loop: give each reader its items. The readers woken run next on the loop, then `taken` is set."""
        while self.items:
            job, item = self.items.popleft()
            if job.aqueue is not None:
                job.aqueue.put_nowait(item)
        self.loop.call_soon(self.taken.set)
