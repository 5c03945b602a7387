"""A llama.cpp context whose output is pooled per sequence: embeddings (`embeddings: true`) or a reranker's scores
(`reranking: true`, llama.cpp's rank pooling through the model's classification head).

Several inputs share each `llama_decode`, one sequence each, in one micro-batch, as non-causal models need.
Embeddings use the model's own pooling (mean, cls or last), else the mean. A reranker reads the query and each
document as llama-server does: through the model's `rerank` template when its GGUF has one (Qwen3-Reranker), else
`[BOS] query [EOS] [SEP] document [EOS]` as the vocabulary asks for each. Scores are probabilities, as Hearth's other
cross-encoders give them: a single logit goes through a sigmoid, several through a softmax (the last class is
"relevant"), and Qwen3's head, which llama.cpp already softmaxes, is read as it is.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable
from typing import Any

import llama_cpp.llama_cpp as L
import numpy as np

from hearth.backends.base import LoadSpec
from hearth.errors import BackendError, InvalidRequest, ModelLoadFailed

EMBED_CONTEXT = 2048  # tokens per batch (and the longest input), when the YAML sets no context_size
EMBED_SEQUENCES = 64  # inputs per llama_decode at most
SOFTMAXED = ("qwen3", "qwen3vl")  # llama.cpp applies the softmax to these rerankers' heads itself


def _has_head(model: Any, architecture: str) -> bool:
    """Whether the GGUF holds a classification head: llama.cpp's converter writes its labels (or, for Qwen3's
    rerankers, rank pooling) into the metadata. llama.cpp itself assumes one output for any model, so that does not
    tell; without a head, rank pooling would score with a hidden state."""
    if L.llama_model_cls_label(model, 0) is not None:
        return True
    buffer = ctypes.create_string_buffer(32)
    found = L.llama_model_meta_val_str(model, f"{architecture}.pooling_type".encode(), buffer, len(buffer))
    return found >= 0 and buffer.value == str(L.LLAMA_POOLING_TYPE_RANK).encode()


class PooledContext:
    def __init__(self, model: Any, vocab: Any, spec: LoadSpec, train_ctx: int, *, rank: bool,
                 tokenize: Callable[[str, bool, bool], list[int]], check_tokens: Callable[[list[int], str], None],
                 reason: Callable[[], str], architecture: str) -> None:
        self.model, self.vocab, self.rank = model, vocab, rank
        self.tokenize, self.check_tokens = tokenize, check_tokens
        self.n_ctx = spec.context_size or min(train_ctx or EMBED_CONTEXT, EMBED_CONTEXT)
        self.n_batch = self.n_ctx
        self.n_out = 1
        self.softmaxed = architecture in SOFTMAXED
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = EMBED_SEQUENCES
        cparams.kv_unified = True  # a batch of inputs shares one stream: each may be as long as the context
        cparams.embeddings = True
        cparams.n_threads = spec.threads
        cparams.n_threads_batch = spec.threads
        cparams.no_perf = True
        if rank:
            self.n_out = int(L.llama_model_n_cls_out(model))
            if not _has_head(model, architecture):
                raise ModelLoadFailed("reranking: true needs a reranker GGUF (a model with a classification head, "
                                      "such as Qwen3-Reranker or jina-reranker); this model has none")
            cparams.pooling_type = L.LLAMA_POOLING_TYPE_RANK
        self.ctx = L.llama_init_from_model(model, cparams)
        if not rank and self.ctx and L.llama_pooling_type(self.ctx) in (L.LLAMA_POOLING_TYPE_NONE,
                                                                      L.LLAMA_POOLING_TYPE_RANK):
            L.llama_free(self.ctx)  # a model with no pooling of its own (a chat model): mean-pool it
            cparams.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            self.ctx = L.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise ModelLoadFailed(f"llama.cpp could not create a {'reranking' if rank else 'embeddings'} context of "
                                  f"{self.n_ctx} tokens: {reason() or 'unknown reason'}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.embedding_size = int(L.llama_model_n_embd(model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.share, self.threads = spec.share(), spec.threads
        self.truncate = bool(spec.config.get("truncate", False))
        template = L.llama_model_chat_template(model, b"rerank") if rank else None
        self.rerank_template = template.decode("utf-8", errors="replace") if template else ""
        self._lock = threading.Lock()

    @property
    def pooling(self) -> str:
        return {1: "mean", 2: "cls", 3: "last", 4: "rank"}.get(L.llama_pooling_type(self.ctx), "?")

    def _fit(self, tokens: list[int], where: str, truncate: bool, param: str) -> list[int]:
        if not tokens:
            raise InvalidRequest(f"{where} is empty", param=param)
        if len(tokens) > self.n_ctx:
            if not truncate:
                raise InvalidRequest(f"{where} is {len(tokens)} tokens, but this model takes at most {self.n_ctx}; "
                                     f"shorten it, or set 'truncate: true' in the model's YAML to cut it", param=param)
            tokens = tokens[: self.n_ctx]
        return tokens

    def embed(self, inputs: list[str | list[int]], truncate: bool, normalize: bool) -> tuple[Any, list[int]]:
        truncate = truncate or self.truncate
        all_tokens = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                tokens = self.tokenize(item, True, False)
            else:
                self.check_tokens(item, "input")
                tokens = list(item)
            where = f"input {index}" if len(inputs) > 1 else "the input"
            all_tokens.append(self._fit(tokens, where, truncate, "input"))
        vectors = self._run(all_tokens, self.embedding_size)
        if normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, [len(t) for t in all_tokens]

    def rerank_tokens(self, query: str, document: str) -> list[int]:
        """The query and a document as one input, as llama-server's format_prompt_rerank makes it."""
        if self.rerank_template:
            text = self.rerank_template.replace("{query}", query).replace("{document}", document)
            return self.tokenize(text, False, True)
        vocab = self.vocab
        eos = L.llama_vocab_eos(vocab)
        eos = eos if eos != L.LLAMA_TOKEN_NULL else L.llama_vocab_sep(vocab)
        tokens = [L.llama_vocab_bos(vocab)] if L.llama_vocab_get_add_bos(vocab) else []
        tokens += self.tokenize(query, False, False)
        if L.llama_vocab_get_add_eos(vocab):
            tokens.append(eos)
        if L.llama_vocab_get_add_sep(vocab):
            tokens.append(L.llama_vocab_sep(vocab))
        tokens += self.tokenize(document, False, False)
        if L.llama_vocab_get_add_eos(vocab):
            tokens.append(eos)
        return tokens

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """A relevance score per document (in input order), and the tokens read."""
        pairs = [self._fit(self.rerank_tokens(query, document), f"the query and document {index} together",
                           self.truncate, "documents") for index, document in enumerate(documents)]
        outputs = self._run(pairs, self.n_out)
        return [self._score(row) for row in outputs], sum(len(p) for p in pairs)

    def _score(self, row: Any) -> float:
        if self.softmaxed:
            return float(row[0])
        if len(row) == 1:
            value = float(row[0])
            return 1 / (1 + math.exp(-value)) if value > -700 else 0.0
        shifted = np.exp(row - row.max())
        return float(shifted[-1] / shifted.sum())

    def _run(self, all_tokens: list[list[int]], width: int) -> Any:
        """Each input's pooled output (`width` floats), computing as many inputs per llama_decode as fit."""
        out = np.zeros((len(all_tokens), width), dtype=np.float32)
        with self._lock:
            threads = self.share.threads()
            if threads != self.threads:
                L.llama_set_n_threads(self.ctx, threads, threads)
                self.threads = threads
            start = 0
            while start < len(all_tokens):
                end, used = start, 0
                while end < len(all_tokens) and end - start < EMBED_SEQUENCES and \
                        used + len(all_tokens[end]) <= self.n_batch:
                    used += len(all_tokens[end])
                    end += 1
                self._decode(all_tokens[start:end], out[start:end], width)
                start = end
        return out

    def _decode(self, batch_tokens: list[list[int]], out: Any, width: int) -> None:
        """One llama_decode for several inputs, each its own sequence."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        batch, n = self.batch, 0
        for seq, tokens in enumerate(batch_tokens):
            for pos, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        result = L.llama_decode(self.ctx, batch)
        if result != 0:
            raise BackendError(f"llama_decode failed with code {result}")
        for seq in range(len(batch_tokens)):
            pointer = L.llama_get_embeddings_seq(self.ctx, seq)
            if not pointer:
                raise BackendError("llama.cpp returned no pooled output")
            out[seq] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(width,))

    def close(self) -> None:
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
