"""`reranking: true` on a llama-cpp model (LocalAI's field, for Qwen3-Reranker and jina-reranker GGUFs): /v1/rerank
with llama.cpp's rank pooling, on a small GGUF reranker made by llama.cpp's converter, checked against the same
model in transformers; and LocalAI's jina-reranker entry installed from a stand-in hub."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import CACHE_DIR, HearthServer, write_yaml
from tests.standin import StandIn
from tests.tiny_reranker_gguf import build

PINNED = Path(__file__).parent / "data" / "localai-gallery" / "gallery"
QUERY = "How many people live in Berlin?"
DOCUMENTS = ["Berlin has a population of 3,520,031 registered inhabitants.",
             "New York City is famous for the Metropolitan Museum of Art.", "A cat sat on the mat.", "Zebra."]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build(tmp_path_factory.mktemp("reranker"), CACHE_DIR)


def reference_scores(folder: Path, query: str, documents: list[str]) -> list[float]:
    """What llama.cpp's rank pooling computes for this model: the classifier on the [CLS] state, through a sigmoid."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    encoded = tokenizer([query] * len(documents), documents, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.bert(**encoded).last_hidden_state[:, 0]
        return torch.sigmoid(model.classifier(hidden)).reshape(-1).tolist()


@pytest.fixture(scope="module")
def hub(built: tuple[Path, Path]) -> Iterator[StandIn]:
    standin = StandIn()
    standin.files["/mudler/LocalAI/master/gallery/virtual.yaml"] = (PINNED / "virtual.yaml").read_bytes()
    data = built[0].read_bytes()
    standin.files["/mradermacher/jina-reranker-v1-tiny-en-GGUF/resolve/main/jina-reranker-v1-tiny-en.f16.gguf"] = data
    entry = next(e for e in yaml.safe_load(gzip.decompress((PINNED / "index.yaml.gz").read_bytes()))
                 if e["name"] == "jina-reranker-v1-tiny-en")
    entry["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()  # the test's own file, its own checksum
    standin.files["/ours/rerankers/main/index.yaml"] = yaml.safe_dump([entry]).encode()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, built: tuple[Path, Path], hub: StandIn) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("rerank-models")
    (models / "reranker.gguf").write_bytes(built[0].read_bytes())
    write_yaml(models, "reranker", {"name": "reranker", "backend": "llama-cpp", "reranking": True,
                                    "parameters": {"model": "reranker.gguf"}})
    write_yaml(models, "not-a-reranker", {"name": "not-a-reranker", "backend": "llama-cpp", "embeddings": True,
                                          "parameters": {"model": "reranker.gguf"}, "similarity_rerank": False})
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": "github:ours/rerankers/index.yaml@main", "HEARTH_GITHUB_RAW_URL": hub.base,
        "HF_ENDPOINT": hub.base, "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield started
    started.stop()


def test_rank_pooling_scores_match_the_model(server: HearthServer, built: tuple[Path, Path]) -> None:
    response = server.http().post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    reply = response.json()
    expected = reference_scores(built[1], QUERY, DOCUMENTS)
    by_index = {r["index"]: r["relevance_score"] for r in reply["results"]}
    assert by_index == pytest.approx(dict(enumerate(expected)), abs=1e-4)
    scores = [r["relevance_score"] for r in reply["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert reply["usage"]["total_tokens"] > 0
    top = server.http().post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS,
                                                  "top_n": 2, "return_documents": True}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in reply["results"][:2]]
    assert top["results"][0]["document"]["text"] == DOCUMENTS[top["results"][0]["index"]]


def test_a_reranker_is_not_an_embedder_nor_a_chat_model(server: HearthServer) -> None:
    embed = server.http().post("/v1/embeddings", json={"model": "reranker", "input": "hello"})
    assert embed.status_code == 400 and "embed" in embed.json()["error"]["message"]
    chat = server.http().post("/v1/chat/completions", json={"model": "reranker", "messages": [
        {"role": "user", "content": "hi"}]})
    assert chat.status_code == 400
    # The same file loaded for embeddings pools the [CLS] state instead and gives vectors (its own setting).
    vectors = server.http().post("/v1/embeddings", json={"model": "not-a-reranker", "input": ["a", "b"]})
    assert vectors.status_code == 200 and len(vectors.json()["data"][0]["embedding"]) == 32


def test_localai_jina_reranker_entry_installs_and_reranks(server: HearthServer) -> None:
    status = server.install(id="jina-reranker-v1-tiny-en")
    assert status["state"] == "done", status
    config = yaml.safe_load((server.models_dir / "jina-reranker-v1-tiny-en.yaml").read_text())
    assert config["reranking"] is True and config["f16"] is True
    reply = server.http().post("/v1/rerank", json={"model": "jina-reranker-v1-tiny-en", "query": QUERY,
                                                   "documents": DOCUMENTS})
    assert reply.status_code == 200 and len(reply.json()["results"]) == len(DOCUMENTS)
    listed = {m["name"]: m for m in server.http().get("/runners/models").json()["models"]}
    assert listed["jina-reranker-v1-tiny-en"]["usecases"] == ["rerank"]


def test_reranking_needs_a_classification_head(tmp_path: Path, smollm2_file: Path) -> None:
    from hearth.gallery.pypi import place

    place(smollm2_file, tmp_path / "smol.gguf")
    write_yaml(tmp_path, "smol-rank", {"name": "smol-rank", "reranking": True, "parameters": {"model": "smol.gguf"}})
    server = HearthServer(tmp_path, tmp_path / "log.txt")
    try:
        response = server.http().post("/v1/rerank", json={"model": "smol-rank", "query": "q", "documents": ["d"]})
        assert response.status_code == 500 and "classification head" in response.json()["error"]["message"]
    finally:
        server.stop()
