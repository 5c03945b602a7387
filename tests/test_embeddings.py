"""Embeddings, reranking and tokenization on real models: all-MiniLM-L6-v2 (ONNX and torch), a tiny random-weight
cross-encoder the test builds and saves in the real formats, and SmolLM2 through llama.cpp."""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from hearth.gallery.builtin import install
from tests.conftest import CACHE_DIR, HearthServer, install_cached, write_yaml

pytestmark = pytest.mark.real_model

FOOD, BREAD, MOVIE = "A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."
BERLIN = [
    "Berlin is well known for its museums.",
    "Berlin had a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "New York City is famous for the Metropolitan Museum of Art.",
    "The capital of France is Paris.",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789", "berlin", "people",
         "live", "how", "many", "in", "the", "population", "is", "city", "museum", "paris", "of", "?", ".", ","]


def build_cross_encoder(folder: Path, onnx: bool) -> None:
    """A tiny BERT cross-encoder with random weights, saved as Hugging Face saves one (and as ONNX)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if onnx:
        sample = tokenizer(["how many people"], ["berlin"], return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(model, tuple(sample[n] for n in names), str(folder / "model.onnx"), input_names=names,
                          output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                          dynamo=False)


def reference_scores(folder: Path, query: str, documents: list[str]) -> list[float]:
    """What the cross-encoder says, computed directly with transformers."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    encoded = tokenizer([query] * len(documents), documents, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return torch.sigmoid(model(**encoded).logits[:, 0]).tolist()


@pytest.fixture(scope="module")
def models(smollm2_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("embedding-models")
    install("all-minilm-l6-v2", models, CACHE_DIR)
    minilm = models / "all-minilm-l6-v2"
    torch_folder = models / "minilm-torch"  # the same model without its ONNX file: sentence-transformers + torch
    torch_folder.mkdir()
    for path in minilm.rglob("*"):
        if path.is_file() and path.suffix != ".onnx":
            target = torch_folder / path.relative_to(minilm)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    write_yaml(models, "minilm-torch", {"name": "minilm-torch", "backend": "sentencetransformers",
                                        "parameters": {"model": "minilm-torch"}})
    write_yaml(models, "minilm-dims", {"name": "minilm-dims", "backend": "sentence-transformers",
                                       "parameters": {"model": "all-minilm-l6-v2"}, "reduce_dimensions": True,
                                       "truncate": True, "similarity_rerank": False})
    build_cross_encoder(models / "tiny-ce", onnx=False)
    write_yaml(models, "tiny-ce", {"name": "tiny-ce", "backend": "rerankers", "parameters": {"model": "tiny-ce"}})
    build_cross_encoder(models / "tiny-ce-onnx", onnx=True)
    write_yaml(models, "tiny-ce-onnx", {"name": "tiny-ce-onnx", "backend": "sentencetransformers",
                                        "parameters": {"model": "tiny-ce-onnx"}})
    install_cached(models, smollm2_file, "smollm2.gguf")
    write_yaml(models, "smol-embed", {"name": "smol-embed", "parameters": {"model": "smollm2.gguf"},
                                      "embeddings": True, "context_size": 512})
    write_yaml(models, "smol", {"name": "smol", "parameters": {"model": "smollm2.gguf"}, "context_size": 512})
    return models


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HearthServer]:
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log")
    yield started
    started.stop()


def vectors(server: HearthServer, model: str, texts: list, **extra) -> np.ndarray:
    reply = server.client().embeddings.create(model=model, input=texts, **extra)
    assert [d.index for d in reply.data] == list(range(len(texts)))
    return np.array([d.embedding for d in reply.data])


@pytest.mark.parametrize("model", ["text-embedding-ada-002", "minilm-torch"])
def test_minilm_similarities(server: HearthServer, model: str) -> None:
    food, bread, movie = vectors(server, model, [FOOD, BREAD, MOVIE])
    assert abs(np.linalg.norm(food) - 1) < 1e-5
    assert food @ bread == pytest.approx(0.755, abs=0.01)
    assert food @ movie == pytest.approx(-0.05, abs=0.02)


def test_onnx_and_torch_agree(server: HearthServer) -> None:
    onnx = vectors(server, "all-minilm-l6-v2", [FOOD, BREAD, MOVIE])
    torch = vectors(server, "minilm-torch", [FOOD, BREAD, MOVIE])
    assert np.abs(onnx - torch).max() < 0.01  # int8 ONNX against float32 torch


def test_response_shape_and_usage(server: HearthServer) -> None:
    response = server.http().post("/v1/embeddings", json={"model": "text-embedding-ada-002", "input": FOOD})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "list" and body["model"] == "text-embedding-ada-002"
    assert body["data"][0]["object"] == "embedding" and len(body["data"][0]["embedding"]) == 384
    assert body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}  # [CLS] a man is eating food . [SEP]


def test_base64_decodes_to_the_same_vectors(server: HearthServer) -> None:
    floats = server.http().post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [FOOD, BREAD]}).json()
    packed = server.http().post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [FOOD, BREAD],
                                                        "encoding_format": "base64"}).json()
    for plain, encoded in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(encoded["embedding"])
        assert struct.unpack(f"<{len(raw) // 4}f", raw) == pytest.approx(plain["embedding"], abs=1e-7)
    # The official client asks for base64 by default and decodes it itself.
    client_vector = server.client().embeddings.create(model="all-minilm-l6-v2", input=FOOD).data[0].embedding
    assert client_vector == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_batch_of_100_keeps_its_order(server: HearthServer) -> None:
    texts = [f"Sentence number {i} is about {['cats', 'dogs', 'birds', 'fish'][i % 4]}" + " really" * (i % 7)
             for i in range(100)]
    batch = vectors(server, "all-minilm-l6-v2", texts)
    for i in (0, 13, 57, 99):
        alone = vectors(server, "all-minilm-l6-v2", [texts[i]])[0]
        assert np.abs(batch[i] - alone).max() < 1e-3
    reversed_batch = vectors(server, "all-minilm-l6-v2", texts[::-1])
    assert np.abs(reversed_batch[::-1] - batch).max() < 1e-3


def test_token_inputs(server: HearthServer) -> None:
    tokens = server.http().post("/v1/tokenize", json={"model": "all-minilm-l6-v2", "content": FOOD,
                                                      "add_special": True}).json()["tokens"]
    from_tokens = vectors(server, "all-minilm-l6-v2", [tokens, tokens])
    from_text = vectors(server, "all-minilm-l6-v2", [FOOD])
    assert np.abs(from_tokens - from_text).max() < 1e-5
    single = server.client().embeddings.create(model="all-minilm-l6-v2", input=tokens, encoding_format="float")
    assert len(single.data) == 1


def test_dimensions(server: HearthServer) -> None:
    client = server.client()
    reply = client.embeddings.create(model="minilm-dims", input=[FOOD, BREAD], dimensions=64)
    short = np.array([d.embedding for d in reply.data])
    assert short.shape == (2, 64) and np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)
    full = vectors(server, "minilm-dims", [FOOD])[0]
    assert short[0] == pytest.approx(full[:64] / np.linalg.norm(full[:64]), abs=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="all-minilm-l6-v2", input=FOOD, dimensions=64)
    assert caught.value.body["param"] == "dimensions" and "reduce_dimensions" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm-dims", input=FOOD, dimensions=1000)
    assert "at most 384" in caught.value.message


def test_long_input_refused_by_default_truncated_when_configured(server: HearthServer) -> None:
    long_text = "word " * 400
    response = server.http().post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": long_text})
    assert response.status_code == 400
    assert "at most 256" in response.json()["error"]["message"] and response.json()["error"]["param"] == "input"
    ok = server.http().post("/v1/embeddings", json={"model": "minilm-dims", "input": long_text})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a", "colour": "blue"}, "colour"),
    ({"input": [[1, -5]]}, "input"),
])
def test_bad_embedding_requests(server: HearthServer, body: dict, param: str) -> None:
    response = server.http().post("/v1/embeddings", json={"model": "all-minilm-l6-v2", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_embeddings_of_a_chat_model_are_refused(server: HearthServer) -> None:
    response = server.http().post("/v1/embeddings", json={"model": "smol", "input": "hello"})
    assert response.status_code == 400 and "does not support embed" in response.json()["error"]["message"]


def test_rerank_by_similarity(server: HearthServer) -> None:
    body = {"model": "text-embedding-ada-002", "query": "How many people live in Berlin?", "documents": BERLIN}
    reply = server.http().post("/v1/rerank", json=body).json()
    assert reply["model"] == "text-embedding-ada-002"
    results = reply["results"]
    assert results[0]["index"] == 1, results
    assert len(results) == 4 and results[0]["document"]["text"] == BERLIN[1]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert reply["usage"]["total_tokens"] > 0


def test_rerank_top_n_rules(server: HearthServer) -> None:
    def ask(**extra) -> tuple[int, dict]:
        response = server.http().post("/v1/rerank", json={
            "model": "all-minilm-l6-v2", "query": "How many people live in Berlin?",
            "documents": [{"text": d} for d in BERLIN], **extra})
        return response.status_code, response.json()

    assert len(ask(top_n=2)[1]["results"]) == 2
    assert len(ask(top_n=10)[1]["results"]) == 4
    status, body = ask(top_n=0)
    assert status == 400 and body["error"]["param"] == "top_n"
    assert "document" not in ask(return_documents=False)[1]["results"][0]
    status, body = ask(documents=[])
    assert status == 400 and body["error"]["param"] == "documents"


def test_rerank_refused_where_turned_off_or_impossible(server: HearthServer) -> None:
    for model in ("minilm-dims", "smol"):
        response = server.http().post("/v1/rerank", json={"model": model, "query": "q", "documents": ["d"]})
        assert response.status_code == 400 and "rerank" in response.json()["error"]["message"]


@pytest.mark.parametrize("model", ["tiny-ce", "tiny-ce-onnx"])
def test_cross_encoder_scores_match_transformers(server: HearthServer, models: Path, model: str) -> None:
    query, documents = "how many people live in berlin?", ["berlin population is 3", "paris museum", "the city"]
    reply = server.http().post("/v1/rerank", json={"model": model, "query": query, "documents": documents}).json()
    got = {r["index"]: r["relevance_score"] for r in reply["results"]}
    expected = reference_scores(models / model, query, documents)
    assert [got[i] for i in range(3)] == pytest.approx(expected, abs=1e-4)
    assert [r["relevance_score"] for r in reply["results"]] == sorted(got.values(), reverse=True)
    refused = server.http().post("/v1/embeddings", json={"model": model, "input": "berlin"})
    assert refused.status_code == 400


def test_llama_cpp_embeddings(server: HearthServer) -> None:
    texts = [FOOD, BREAD, MOVIE, "Berlin is a city."]
    together = vectors(server, "smol-embed", texts)
    assert together.shape == (4, 576)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    for i, text in enumerate(texts):
        assert np.abs(vectors(server, "smol-embed", [text])[0] - together[i]).max() < 1e-3, "batched = alone"
    chat = server.http().post("/v1/chat/completions", json={"model": "smol-embed",
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400
    long = server.http().post("/v1/embeddings", json={"model": "smol-embed", "input": "word " * 600})
    assert long.status_code == 400 and "at most 512" in long.json()["error"]["message"]


def test_tokenize_round_trip(server: HearthServer) -> None:
    text = "Héllo, wörld! <|im_start|> 🙂 \n\ttabs"
    for model in ("smol", "all-minilm-l6-v2"):
        tokens = server.http().post("/v1/tokenize", json={"model": model, "content": text}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        if model == "smol":
            content = server.http().post("/v1/detokenize", json={"model": model, "tokens": tokens}).json()["content"]
            assert content == text
    bad = server.http().post("/v1/detokenize", json={"model": "smol", "tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
