"""Archives in galleries: LocalAI's piper voices come as `.tar.gz` and are unpacked into the models directory;
hostile archives are refused with a clear error and leave nothing behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hearth.gallery.archive import unpack
from hearth.gallery.builtin import BUILTIN
from hearth.gallery.download import DownloadError
from hearth.gallery.pypi import fetch_to_cache
from tests.conftest import CACHE_DIR, HearthServer
from tests.standin import StandIn

PINNED = Path(__file__).parent / "data" / "localai-gallery" / "gallery"


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo,
                                                                                                  bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


HOSTILE = {
    "dotdot": ([member("voice/../../escape.onnx")], "would leave its folder"),
    "absolute": ([member("/etc/cron.d/evil")], "absolute path"),
    "symlink-out": ([member("voice.onnx", kind=tarfile.SYMTYPE, link="/etc/passwd")], "is a link"),
    "hardlink": ([member("a.onnx"), member("b.onnx", kind=tarfile.LNKTYPE, link="../../etc/passwd")], "is a link"),
    "device": ([member("dev", kind=tarfile.CHRTYPE)], "special file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(tmp_path: Path, case: str) -> None:
    members, says = HOSTILE[case]
    archive = tmp_path / "voice.tar.gz"
    archive.write_bytes(tar_gz([member("first-ok.onnx", b"fine"), *members]))
    target = tmp_path / "models"
    target.mkdir()
    with pytest.raises(DownloadError, match=says):
        unpack(archive, target)
    assert list(target.iterdir()) == [], "nothing may be left behind"
    assert not (tmp_path / "escape.onnx").exists()


def test_archive_past_its_limit_is_refused(tmp_path: Path) -> None:
    """A header that claims more than the limit is refused before a byte is written; so is a body that grows past
    it while being copied (given a small limit here)."""
    huge = tarfile.TarInfo("bomb.bin")
    huge.size = 9 * 2**30
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(huge.tobuf() + b"\0" * 4096))
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="unpacks to more than"):
        unpack(tmp_path / "bomb.tar.gz", tmp_path / "out")
    (tmp_path / "zeros.tar.gz").write_bytes(tar_gz([member("zeros.bin", b"\0" * 3_000_000)]))
    with pytest.raises(DownloadError, match="unpacks to more than 1000000 bytes"):
        unpack(tmp_path / "zeros.tar.gz", tmp_path / "out", max_bytes=1_000_000)
    assert list((tmp_path / "out").iterdir()) == []


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(DownloadError, match="not a readable archive"):
        unpack(tmp_path / "x.tar.gz", tmp_path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    """GitHub (LocalAI's pinned piper base config, a gallery) and a release host serving a voice as LocalAI's piper
    entries ship them: the real en_US-joe-medium voice in a .tar.gz, and hostile archives under voice names."""
    standin = StandIn()
    for path in PINNED.glob("*.yaml"):
        standin.files[f"/mudler/LocalAI/master/gallery/{path.name}"] = path.read_bytes()
    joe = BUILTIN["en_US-joe-medium"]
    onnx, config = (fetch_to_cache(spec, CACHE_DIR).read_bytes() for spec in joe.files)
    voice = tar_gz([member("en-us-joe-medium.onnx", onnx), member("en-us-joe-medium.onnx.json", config),
                    member("MODEL_CARD", b"Piper voice: joe")])
    standin.files["/releases/voice-en-us-joe-medium.tar.gz"] = voice
    standin.files["/releases/voice-evil.tar.gz"] = tar_gz(
        [member("en-us-evil.onnx", b"x"), member("../../../../tmp/hearth-escape", b"x")])
    entries = [
        {"name": "voice-en-us-joe-medium", "url": "github:mudler/LocalAI/gallery/piper.yaml@master",
         "overrides": {"parameters": {"model": "en-us-joe-medium.onnx"}},
         "files": [{"filename": "voice-en-us-joe-medium.tar.gz", "uri": f"{standin.base}/releases/"
                    f"voice-en-us-joe-medium.tar.gz", "sha256": hashlib.sha256(voice).hexdigest()}]},
        {"name": "voice-evil", "url": "github:mudler/LocalAI/gallery/piper.yaml@master",
         "overrides": {"parameters": {"model": "en-us-evil.onnx"}},
         "files": [{"filename": "voice-evil.tar.gz", "uri": f"{standin.base}/releases/voice-evil.tar.gz",
                    "sha256": ""}]},
    ]
    standin.files["/ours/voices/main/index.yaml"] = yaml.safe_dump(entries).encode()
    yield standin
    standin.close()


def test_localai_piper_voice_archive_installs_and_speaks(tmp_path: Path, hub: StandIn) -> None:
    server = HearthServer(tmp_path / "models", tmp_path / "log.txt", env={
        "HEARTH_GALLERIES": "github:ours/voices/index.yaml@main", "HEARTH_GITHUB_RAW_URL": hub.base,
        "HEARTH_DOWNLOAD_ALLOW": "127.0.0.1", "HEARTH_CACHE_DIR": str(tmp_path / "cache")})
    try:
        http = server.http()
        status = server.install(id="voice-en-us-joe-medium")
        assert status["state"] == "done", status
        assert any("voice-en-us-joe-medium.tar.gz: unpacked (3 files)" in note for note in status["notes"])
        models = tmp_path / "models"
        assert (models / "en-us-joe-medium.onnx").is_file() and (models / "MODEL_CARD").is_file()
        assert not (models / "voice-en-us-joe-medium.tar.gz").exists(), "the archive is not kept once unpacked"
        speech = http.post("/v1/audio/speech", json={"model": "voice-en-us-joe-medium", "input": "Hello there.",
                                                     "response_format": "wav"})
        assert speech.status_code == 200 and speech.content[:4] == b"RIFF" and len(speech.content) > 20_000
        # A hostile voice archive fails the install and leaves the models directory as it was.
        before = sorted(p.name for p in models.iterdir())
        status = server.install(id="voice-evil")
        assert status["state"] == "failed" and "would leave its folder" in status["error"]
        assert sorted(p.name for p in models.iterdir()) == before
        assert not Path("/tmp/hearth-escape").exists()
        # Removing the voice removes everything its archive placed.
        removed = http.post("/models/delete/voice-en-us-joe-medium").json()["removed"]
        assert {"en-us-joe-medium.onnx", "en-us-joe-medium.onnx.json", "MODEL_CARD"} <= set(removed)
        assert not any(models.glob("en-us-joe*")) and not (models / "MODEL_CARD").exists()
    finally:
        server.stop()

