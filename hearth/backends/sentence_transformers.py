"""Sentence-transformers folders: embeddings (bi-encoders) and reranking (cross-encoders and bi-encoders).

A Hugging Face sentence-transformers folder runs with onnxruntime + tokenizers when it holds an ONNX file (fast,
no torch): the model's token embeddings are pooled as `1_Pooling/config.json` says and normalised when
`modules.json` has a Normalize module. Without an ONNX file it runs with sentence-transformers on the CPU build of
torch. A folder whose `config.json` names a `...ForSequenceClassification` architecture is a cross-encoder: it
scores (query, document) pairs and serves reranking only.

Options from the model YAML: `truncate` (cut inputs longer than the model's limit instead of refusing them),
`similarity_rerank` (false: a bi-encoder does not serve /v1/rerank), `onnx_file` (which ONNX file to use, relative
to the folder), `batch_size` (inputs per forward pass, default 32).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import LoadSpec, ModelDescription, need
from hearth.cores import Share, follow_in_torch
from hearth.errors import InvalidRequest, ModelLoadFailed

log = logging.getLogger("hearth.runner.sentence_transformers")

DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 512


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadFailed(f"{path.name} in the model folder cannot be read: {exc}") from None


class Backend(BaseBackend):
    name = "sentencetransformers"

    def __init__(self) -> None:
        self.folder = Path()
        self.cross_encoder = False
        self.max_tokens = DEFAULT_MAX_TOKENS
        self.batch_size = DEFAULT_BATCH
        self.truncate = False
        self.pooling = "mean"
        self.normalized = False
        self.dimensions = 0
        self.engine = ""  # "onnx" or "torch"
        self.session: Any = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.vocab_size = 0
        self._lock = threading.Lock()
        self.share = Share(1)

    # -- loading ---------------------------------------------------------------------------------------

    def load(self, spec: LoadSpec) -> ModelDescription:
        folder = Path(spec.model_path)
        if not folder.is_dir():
            raise ModelLoadFailed(f"{folder.name} is not a folder: the sentencetransformers backend takes a Hugging "
                                  f"Face model folder (config.json, tokenizer.json, weights)")
        self.folder = folder
        config = _read_json(folder / "config.json") or {}
        architectures = config.get("architectures") or []
        self.cross_encoder = any(a.endswith("ForSequenceClassification") for a in architectures)
        self.vocab_size = int(config.get("vocab_size") or 0)
        self.truncate = bool(spec.config.get("truncate", False))
        self.batch_size = max(1, int(spec.config.get("batch_size") or DEFAULT_BATCH))
        bert_config = _read_json(folder / "sentence_bert_config.json") or {}
        limits = [value for value in (bert_config.get("max_seq_length"), config.get("max_position_embeddings"))
                  if isinstance(value, int) and value > 0]
        self.max_tokens = min(limits) if limits else DEFAULT_MAX_TOKENS
        if spec.context_size:
            self.max_tokens = min(self.max_tokens, spec.context_size)
        self._read_pooling(folder, config)
        onnx = self._onnx_file(folder, spec.config.get("onnx_file"))
        if onnx is not None:
            self._load_onnx(onnx, spec.threads)
        else:
            self._load_torch(spec.threads)
            self.share = spec.share()
        capabilities = ["rerank", "tokenize"] if self.cross_encoder else ["embed", "tokenize"]
        if not self.cross_encoder and spec.config.get("similarity_rerank", True):
            capabilities.append("rerank")
        log.info("%s loaded with %s (%s, %d tokens at most, %s pooling%s)", folder.name, self.engine,
                 "cross-encoder" if self.cross_encoder else f"{self.dimensions} dimensions", self.max_tokens,
                 self.pooling, ", normalised" if self.normalized else "")
        return ModelDescription(
            backend=self.name,
            capabilities=capabilities,
            context_size=self.max_tokens,
            train_context_size=int(config.get("max_position_embeddings") or 0),
            architecture=str(config.get("model_type") or ""),
            embedding_size=self.dimensions,
            parallel=1,
            metadata={"engine": self.engine, "pooling": self.pooling,
                      "kind": "cross-encoder" if self.cross_encoder else "bi-encoder"},
        )

    def _read_pooling(self, folder: Path, config: dict[str, Any]) -> None:
        modules = _read_json(folder / "modules.json") or []
        pooling_config: dict[str, Any] = {}
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith("Normalize"):
                self.normalized = True
            elif kind.endswith("Pooling"):
                pooling_config = _read_json(folder / module.get("path", "") / "config.json") or {}
            elif not kind.endswith("Transformer"):
                raise ModelLoadFailed(f"modules.json uses {kind}, which Hearth cannot run")
        for mode in ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "lasttoken", "mean_tokens"):
            if pooling_config.get(f"pooling_mode_{mode}"):
                self.pooling = {"cls_token": "cls", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                                "lasttoken": "last", "mean_tokens": "mean"}[mode]
                break
        self.dimensions = int(pooling_config.get("word_embedding_dimension") or config.get("hidden_size") or 0)

    @staticmethod
    def _onnx_file(folder: Path, chosen: str | None) -> Path | None:
        if chosen:
            path = (folder / chosen).resolve()
            if folder.resolve() not in path.parents or not path.is_file():
                raise ModelLoadFailed(f"onnx_file {chosen} is not a file inside the model folder")
            return path
        candidates = sorted(folder.glob("*.onnx")) + sorted(folder.glob("onnx/*.onnx"))
        return candidates[0] if candidates else None

    def _load_onnx(self, path: Path, threads: int) -> None:
        onnxruntime, tokenizers = need("embeddings", "onnxruntime", "tokenizers", why=path.name)
        tokenizer_file = self.folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadFailed("the model folder has an ONNX file but no tokenizer.json")
        self.tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for bad files
            raise ModelLoadFailed(f"onnxruntime could not load {path.name}: {exc}") from None
        self._inputs = {i.name for i in self.session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= self._inputs:
            raise ModelLoadFailed(f"{path.name} does not take input_ids and attention_mask")
        if not self.vocab_size:
            self.vocab_size = self.tokenizer.get_vocab_size()
        self.engine = "onnx"

    def _load_torch(self, threads: int) -> None:
        torch, sentence_transformers = need("torch", "torch", "sentence_transformers",
                                            why="a folder with no ONNX file")
        torch.set_num_threads(threads)
        try:
            if self.cross_encoder:
                self.model = sentence_transformers.CrossEncoder(str(self.folder), device="cpu", max_length=self.max_tokens)
            else:
                self.model = sentence_transformers.SentenceTransformer(str(self.folder), device="cpu")
                self.model.max_seq_length = self.max_tokens
        except Exception as exc:  # a broken folder fails in many ways
            raise ModelLoadFailed(f"sentence-transformers could not load {self.folder.name}: {exc}") from None
        self.tokenizer = self.model.tokenizer
        if not self.dimensions and not self.cross_encoder:
            self.dimensions = int(self.model.get_sentence_embedding_dimension() or 0)
        self.engine = "torch"

    # -- tokens ----------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        if self.engine == "onnx":
            return list(self.tokenizer.encode(text).ids)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        if self.engine == "onnx":
            return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        self._check_tokens(tokens, "tokens")
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _check_tokens(self, tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < self.vocab_size:
                raise InvalidRequest(f"token {token} is not in the model's vocabulary (0..{self.vocab_size - 1})",
                                     param=param)

    def _fit(self, ids: list[int], index: int, truncate: bool) -> list[int]:
        """Input ids within the model's limit: cut (keeping the final [SEP]-like token) or refused."""
        if len(ids) <= self.max_tokens:
            return ids
        if not truncate:
            where = f"input {index}" if index >= 0 else "the input"
            raise InvalidRequest(f"{where} is {len(ids)} tokens, but this model takes at most {self.max_tokens}; "
                                 f"shorten it, or set 'truncate: true' in the model's YAML to cut it", param="input")
        return ids[: self.max_tokens - 1] + ids[-1:]

    # -- embeddings ------------------------------------------------------------------------------------

    def embed(self, inputs: list[str | list[int]], truncate: bool, normalize: bool) -> tuple[np.ndarray, list[int]]:
        if self.cross_encoder:
            return super().embed(inputs, truncate, normalize)
        truncate = truncate or self.truncate
        all_ids = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                ids = self._ids(item)
            else:
                self._check_tokens(item, "input")
                ids = list(item)
            all_ids.append(self._fit(ids, index if len(inputs) > 1 else -1, truncate))
        counts = [len(ids) for ids in all_ids]
        vectors = self._embed_onnx(all_ids) if self.engine == "onnx" else self._embed_torch(all_ids)
        if normalize or self.normalized:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype(np.float32), counts

    def _batches(self, all_ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped into batches of similar length (less padding), each batch in input order."""
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def _embed_onnx(self, all_ids: list[list[int]]) -> np.ndarray:
        result = np.zeros((len(all_ids), self.dimensions), dtype=np.float32)
        for batch in self._batches(all_ids):
            ids, mask = _padded([all_ids[i] for i in batch])
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feed)[0]
            result[batch] = self._pool(hidden, mask)
        return result

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        weights = mask[..., None].astype(np.float32)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            return hidden[np.arange(len(hidden)), mask.sum(1) - 1]
        if self.pooling == "max":
            return np.where(weights > 0, hidden, -1e9).max(1)
        summed = (hidden * weights).sum(1)
        counts = np.maximum(weights.sum(1), 1e-9)
        if self.pooling == "mean_sqrt_len":
            return summed / np.sqrt(counts)
        return summed / counts

    def _embed_torch(self, all_ids: list[list[int]]) -> np.ndarray:
        import torch

        result = np.zeros((len(all_ids), self.dimensions), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for batch in self._batches(all_ids):
                follow_in_torch(self.share, torch)
                ids, mask = _padded([all_ids[i] for i in batch])
                features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                            "token_type_ids": torch.zeros(ids.shape, dtype=torch.int64)}
                output = self.model(features)
                result[batch] = output["sentence_embedding"].float().numpy()
        return result

    # -- reranking -------------------------------------------------------------------------------------

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        if not self.cross_encoder:
            return super().rerank(query, documents)
        if self.engine == "torch":
            import torch

            with self._lock:
                follow_in_torch(self.share, torch)
                scores = self.model.predict([(query, d) for d in documents], batch_size=self.batch_size,
                                            convert_to_numpy=True, show_progress_bar=False)
            return [float(s) for s in np.asarray(scores).reshape(len(documents), -1)[:, -1]]
        pairs = []
        for index, document in enumerate(documents):
            encoding = self.tokenizer.encode(query, document)
            ids, types = list(encoding.ids), list(encoding.type_ids)
            if len(ids) > self.max_tokens:
                if not self.truncate:
                    raise InvalidRequest(f"the query and document {index} are {len(ids)} tokens together, but this "
                                         f"model takes at most {self.max_tokens}", param="documents")
                ids, types = ids[: self.max_tokens - 1] + ids[-1:], types[: self.max_tokens - 1] + types[-1:]
            pairs.append((ids, types))
        scores = np.zeros(len(documents), dtype=np.float32)
        for batch in self._batches([p[0] for p in pairs]):
            ids, mask = _padded([pairs[i][0] for i in batch])
            types, _ = _padded([pairs[i][1] for i in batch])
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = types
            logits = self.session.run(None, feed)[0].reshape(len(batch), -1)
            scores[batch] = 1 / (1 + np.exp(-logits[:, -1])) if logits.shape[1] == 1 else \
                _softmax(logits)[:, -1]
        return [float(s) for s in scores]


def _padded(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
