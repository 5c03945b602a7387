"""LocalAI's galleries as LocalAI's users give them: the whole pinned LocalAI index through a stand-in GitHub, read
entry by entry, and hostile or broken galleries that must never take a route down."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import HearthServer, free_port
from tests.standin import StandIn

PINNED = Path(__file__).parent / "data" / "localai-gallery" / "gallery"
LOCALAI = "github:mudler/LocalAI/gallery/index.yaml@master"
INDEX_PATH = "/mudler/LocalAI/master/gallery/index.yaml"
PAYLOAD = os.urandom(200_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(scope="module")
def github() -> Iterator[StandIn]:
    """raw.githubusercontent.com for mudler/LocalAI at master (the pinned copy), and a few galleries of our own."""
    standin = StandIn()
    standin.files[INDEX_PATH] = gzip.decompress((PINNED / "index.yaml.gz").read_bytes())
    for path in PINNED.glob("*.yaml"):
        standin.files[f"/mudler/LocalAI/master/gallery/{path.name}"] = path.read_bytes()
    standin.files["/files/model.bin"] = PAYLOAD
    entries = [
        {"name": "llama-3.2-1b-instruct:q4_k_m", "description": "a name with a colon",
         "overrides": {"backend": "fake", "fake": {"reply": "colon name answering"}},
         "files": [{"filename": "colon.bin", "uri": f"{standin.base}/files/model.bin", "sha256": SHA}]},
        {"name": "voix-française-é", "overrides": {"backend": "fake", "fake": {"reply": "bonjour"}},
         "files": [{"filename": "voix.bin", "uri": f"{standin.base}/files/model.bin", "sha256": SHA}]},
        {"name": "no-checksum", "overrides": {"backend": "fake", "parameters": {"top_k": -1, "seed": -1}},
         "files": [{"filename": "unchecked.bin", "uri": f"{standin.base}/files/model.bin", "sha256": ""}]},
        {"name": "renamed-by-overrides", "overrides": {"backend": "fake", "name": "The-Renamed-GGUF"},
         "files": [{"filename": "renamed.bin", "uri": f"{standin.base}/files/model.bin", "sha256": SHA}]},
        {"description": "an entry without a name"},
        {"name": "bad-files", "overrides": {"backend": "fake"}, "files": "not a list"},
        {"name": "private-base", "url": "http://10.1.2.3/base.yaml"},
        {"name": "missing-base", "url": "github:someone/nothing/base.yaml@main"},
        {"name": "unknown-backend", "overrides": {"backend": "crispasr", "parameters": {"model": "x.bin"}},
         "files": [{"filename": "x.bin", "uri": f"{standin.base}/files/model.bin", "sha256": SHA}]},
        "not even a mapping",
    ]
    standin.files["/ours/galleries/main/index.yaml"] = yaml.safe_dump(entries, allow_unicode=True).encode()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, github: StandIn) -> Iterator[HearthServer]:
    galleries = json.dumps([{"name": "localai", "url": LOCALAI},
                            {"name": "ours", "url": "github:ours/galleries/index.yaml@main"}])
    started = HearthServer(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("log") / "hearth.log", env={
        "HEARTH_GALLERIES": galleries, "HEARTH_GITHUB_RAW_URL": github.base, "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
        "HEARTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield started
    started.stop()






def test_localai_whole_index_loads_entry_by_entry(server: HearthServer, github: StandIn) -> None:
    response = server.http().get("/models/available")
    assert response.status_code == 200
    localai = [e for e in response.json() if e["gallery"] == "localai"]
    assert len(localai) == 1709
    usable = [e for e in localai if e["available"]]
    assert len(usable) >= 1340, f"only {len(usable)} of LocalAI's entries can be installed"
    out = [e for e in localai if not e["available"]]
    assert out and all(e["reason"] for e in out)
    assert any("crispasr" in e["reason"] for e in out)
    translator = next(e for e in localai if e["name"] == "hy-mt2-1.8b-q8")  # a variant, through a YAML merge key
    assert translator["available"] and translator["backend"] == "llama-cpp"
    whisper = next(e for e in localai if e["name"] == "whisper-base")  # whisper.cpp's ggml file
    assert whisper["available"] and whisper["backend"] == "whisper"
    states = {g["name"]: g for g in server.http().get("/models/galleries").json()}
    assert states["localai"]["entries"] == 1709 and states["localai"]["error"] is None
    assert states["localai"]["unavailable"] == len(out)
    # The index and every base config were fetched once, and are kept: asking again fetches nothing.
    before = sum(github.hits.values())
    assert github.hits[INDEX_PATH] == 1
    assert max(n for path, n in github.hits.items() if path.startswith("/mudler/")) == 1
    assert server.http().get("/models/available").status_code == 200
    assert sum(github.hits.values()) == before


def test_unusable_entries_are_listed_with_reasons(server: HearthServer) -> None:
    ours = {e["name"]: e for e in server.http().get("/models/available").json() if e["gallery"] == "ours"}
    assert ours["llama-3.2-1b-instruct:q4_k_m"]["available"]
    assert ours["voix-française-é"]["available"] and ours["no-checksum"]["available"]
    assert "name" in ours["entry 4"]["reason"]
    assert "files" in ours["bad-files"]["reason"]
    assert "10.1.2.3" in ours["private-base"]["reason"] and "private" in ours["private-base"]["reason"]
    assert "raw.githubusercontent" not in ours["missing-base"]["reason"]
    assert "someone/nothing/main/base.yaml" in ours["missing-base"]["reason"] and "404" in ours["missing-base"]["reason"]
    assert "crispasr" in ours["unknown-backend"]["reason"]
    assert "mapping" in ours["entry 9"]["reason"]
    refused = server.http().post("/models/apply", json={"id": "ours@unknown-backend"})
    assert refused.status_code == 400 and "crispasr" in refused.json()["error"]["message"]


def test_names_with_colons_and_accents_install_safely(server: HearthServer) -> None:
    for name, reply in (("llama-3.2-1b-instruct:q4_k_m", "colon name answering"), ("voix-française-é", "bonjour")):
        status = server.install(id=f"ours@{name}")
        assert status["state"] == "done", status
        answer = server.client().chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == reply
    files = sorted(p.name for p in server.models_dir.glob("*.yaml"))
    assert all(":" not in f and f.isascii() for f in files), files
    assert any(f.startswith("llama-3.2-1b-instruct-q4_k_m-") for f in files)
    listed = {e["name"]: e for e in server.http().get("/models/available").json() if e["gallery"] == "ours"}
    assert listed["llama-3.2-1b-instruct:q4_k_m"]["installed"]
    deleted = server.http().post("/models/delete/llama-3.2-1b-instruct:q4_k_m")
    assert deleted.status_code == 200 and not (server.models_dir / "colon.bin").exists()


def test_empty_checksum_installs_and_says_so(server: HearthServer) -> None:
    status = server.install(id="no-checksum")
    assert status["state"] == "done", status
    assert any("unchecked.bin" in note and "no sha256" in note for note in status["notes"])
    config = yaml.safe_load((server.models_dir / "no-checksum.yaml").read_text())
    assert config["parameters"]["top_k"] == -1, "the YAML keeps LocalAI's spelling"
    reply = server.client().chat.completions.create(model="no-checksum", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].finish_reason == "stop"


def test_overrides_rename_the_model_as_in_localai(server: HearthServer) -> None:
    status = server.install(id="renamed-by-overrides")
    assert status["state"] == "done", status
    names = [m.id for m in server.client().models.list().data]
    assert "The-Renamed-GGUF" in names and "renamed-by-overrides" not in names
    assert next(e for e in server.http().get("/models/available").json()
                if e["name"] == "renamed-by-overrides")["installed"]


def test_apply_an_index_url_by_name(server: HearthServer) -> None:
    status = server.install(url="github:ours/galleries/index.yaml@main", name="voix-française-é")
    assert status["state"] == "done", status
    listing = server.http().post("/models/apply", json={"url": "github:ours/galleries/index.yaml@main"})
    assert listing.status_code == 400 and "send 'name'" in listing.json()["error"]["message"]


@pytest.fixture(scope="module")
def hostile() -> Iterator[StandIn]:
    standin = StandIn()

    def huge() -> tuple[int, object]:  # 50 MB of entries, sent as they are made
        line = b"- {name: padding, description: '" + b"x" * 1000 + b"'}\n"
        return 50 * 2**20, (line for _ in range(50 * 2**20 // len(line) + 1))

    standin.streams["/big/index.yaml"] = huge
    standin.files["/many/index.yaml"] = b"".join(b"- {name: m%d}\n" % n for n in range(100_000))
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(9)]
    standin.files["/laughs/index.yaml"] = "\n".join([*laughs, "entries: *j"]).encode()  # 10^10 nodes expanded
    standin.files["/notyaml/index.yaml"] = b"- name: [unclosed\n"
    standin.files["/ok/index.yaml"] = yaml.safe_dump([{"name": "fine", "overrides": {"backend": "fake"}}]).encode()
    yield standin
    standin.close()


def test_hostile_galleries_are_refused_and_the_rest_stays(tmp_path: Path, hostile: StandIn) -> None:
    galleries = ",".join(f"{hostile.base}/{name}/index.yaml" for name in ("big", "many", "laughs", "notyaml", "ok"))
    server = HearthServer(tmp_path / "models", tmp_path / "log.txt", env={
        "HEARTH_GALLERIES": galleries, "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1", "HEARTH_CACHE_DIR": str(tmp_path / "c")})
    try:
        response = server.http().get("/models/available")
        assert response.status_code == 200
        names = {e["name"] for e in response.json()}
        assert "fine" in names and "smollm2-135m-instruct" in names and "padding" not in names
        states = {g["name"]: g for g in server.http().get("/models/galleries").json()}
        assert "more than the 16777216" in states["index"]["error"]
        assert f"{hostile.base}/big/index.yaml" in states["index"]["error"]
        assert "100000 entries" in states["index-2"]["error"]
        assert "nodes" in states["index-3"]["error"]
        assert "not valid YAML" in states["index-4"]["error"]
        assert states["index-5"]["error"] is None and states["index-5"]["entries"] == 1
        missing = server.http().post("/models/apply", json={"id": "padding"})
        assert missing.status_code == 404 and "could not be read" in missing.json()["error"]["message"]
    finally:
        server.stop()


def test_cli_lists_reasons_and_gallery_errors(tmp_path: Path, github: StandIn, hostile: StandIn) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(HEARTH_GITHUB_RAW_URL=github.base, HEARTH_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", "hearth", "models", "list", "--available", "--models-dir", str(tmp_path),
         "--gallery", "github:ours/galleries/index.yaml@main", "--gallery", f"{hostile.base}/notyaml/index.yaml",
         "--download-allow", "127.0.0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "cannot" in lines["unknown-backend"] and "crispasr" in lines["unknown-backend"]
    assert "cannot" not in lines["no-checksum"]
    assert "not valid YAML" in result.stderr and f"{hostile.base}/notyaml/index.yaml" in result.stderr


def test_gallery_settings_take_localai_forms() -> None:
    from hearth.settings import Settings

    given = Settings(galleries=[json.dumps([{"name": "localai", "url": LOCALAI}]),
                                "/tmp/a.yaml,https://x.org/g.yaml"])
    assert [(g.name, g.url) for g in given.galleries] == [
        ("localai", LOCALAI), ("a", "/tmp/a.yaml"), ("g", "https://x.org/g.yaml")]
    with pytest.raises(ValueError):
        Settings(galleries=["[{not json"])


def mutated_entries(count: int, seed: int = 0) -> list[object]:
    """LocalAI's entries with fields swapped at random for values of other types and shapes; their files point at
    a closed loopback port (nothing leaves this machine)."""
    text = gzip.decompress((PINNED / "index.yaml.gz").read_bytes()).decode()
    closed = f"http://127.0.0.1:{free_port()}/"
    entries = yaml.safe_load(text.replace("huggingface://", closed).replace("https://", closed))
    odd = [None, 1, -1, 0, 1.5, True, [], {}, "", "x" * 3000, [1, {"a": None}], {"model": [1]}, "../../etc/passwd",
           "\x01", "é:ü/", float("inf")]
    rng = random.Random(seed)

    def mutate(value: object) -> object:
        if isinstance(value, dict) and value and rng.random() < 0.7:
            changed = dict(value)
            key = rng.choice(list(changed))
            changed[key] = mutate(changed[key]) if rng.random() < 0.6 else rng.choice(odd)
            if rng.random() < 0.2:
                changed[rng.choice(["parameters", "files", "options", "mmproj", "backend", "known_usecases",
                                    "template", "artifacts", "reranking", "name", "url"])] = rng.choice(odd)
            return changed
        if isinstance(value, list) and value and rng.random() < 0.7:
            changed_list = list(value)
            index = rng.randrange(len(changed_list))
            changed_list[index] = mutate(changed_list[index])
            return changed_list
        return rng.choice(odd)

    return [mutate(rng.choice(entries)) for _ in range(count)]


def test_no_gallery_content_makes_a_route_fail(tmp_path: Path, github: StandIn) -> None:
    """Hundreds of LocalAI entries with fields of the wrong type or shape: every one is listed (usable, or with a
    reason), and installing any answers in the client's protocol, never a 5xx."""
    gallery = tmp_path / "mutated.yaml"
    gallery.write_text(yaml.safe_dump(mutated_entries(400), allow_unicode=True))
    server = HearthServer(tmp_path / "models", tmp_path / "log.txt", env={
        "HEARTH_GALLERIES": str(gallery), "HEARTH_CACHE_DIR": str(tmp_path / "cache"),
        "HEARTH_GITHUB_RAW_URL": github.base, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    try:
        listed = server.http().get("/models/available")
        assert listed.status_code == 200
        mine = [e for e in listed.json() if e["gallery"] == "mutated"]
        assert len(mine) == 400 and all(e["available"] or e["reason"] for e in mine)
        for entry in mine[:60]:
            response = server.http().post("/models/apply", json={"id": entry["id"]})
            assert response.status_code < 500, response.text
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_cache_time_is_a_setting(tmp_path: Path) -> None:
    """With no cache time, each listing reads the index again (and sees it change); a restarted server reads the
    cached copy from disk while it is fresh."""
    standin = StandIn()
    standin.files["/g/index.yaml"] = yaml.safe_dump([{"name": "first", "overrides": {"backend": "fake"}}]).encode()
    env = {"HEARTH_GALLERIES": f"{standin.base}/g/index.yaml", "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1",
           "HEARTH_CACHE_DIR": str(tmp_path / "cache")}
    try:
        fresh = HearthServer(tmp_path / "models", tmp_path / "log1.txt", env={**env, "HEARTH_GALLERY_CACHE_MINUTES": "0"})
        try:
            assert "first" in {e["name"] for e in fresh.http().get("/models/available").json()}
            standin.files["/g/index.yaml"] = yaml.safe_dump([{"name": "second", "overrides": {"backend": "fake"}}]).encode()
            assert "second" in {e["name"] for e in fresh.http().get("/models/available").json()}
        finally:
            fresh.stop()
        hits = standin.hits["/g/index.yaml"]
        kept = HearthServer(tmp_path / "models", tmp_path / "log2.txt", env=env)  # an hour, by default
        try:
            assert "second" in {e["name"] for e in kept.http().get("/models/available").json()}
            assert standin.hits["/g/index.yaml"] == hits, "the copy on disk was fresh enough"
        finally:
            kept.stop()
    finally:
        standin.close()


def test_apply_a_base_config_url_as_localai_clients_do(server: HearthServer, github: StandIn) -> None:
    """LocalAI's `apply` body: `url` a base config (here LocalAI's piper.yaml, which names no model), with the name,
    overrides and files of the model to install from it."""
    status = server.install(url="github:mudler/LocalAI/gallery/piper.yaml@master", name="from-base-url",
                            overrides={"backend": "fake", "fake": {"reply": "made from a base config"}},
                            files=[{"filename": "base-url.bin", "uri": f"{github.base}/files/model.bin",
                                    "sha256": SHA}])
    assert status["state"] == "done", status
    reply = server.client().chat.completions.create(model="from-base-url", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "made from a base config"
    for bad in ("file:///etc/passwd.yaml", "github:../../x.yaml", "ftp://example.com/x.yaml"):
        response = server.http().post("/models/apply", json={"url": bad, "name": "x"})
        assert response.status_code == 400, (bad, response.text)
    for body in ({"id": "no-checksum", "files": [{"filename": "../../evil", "uri": "https://x.org/e"}]},
                 {"id": "no-checksum", "files": "many"}, {"id": "no-checksum", "name": ""}):
        response = server.http().post("/models/apply", json=body)
        assert response.status_code == 400 and "error" in response.json(), (body, response.text)
