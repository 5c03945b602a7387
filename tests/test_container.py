"""The container image's recipe: the Dockerfile passes hadolint, runs as a user, checks /readyz, and the wheel it
installs carries every file the server reads at run time. (No image is built here: this machine reaches no
container registry for the base image.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from hearth.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines[stages[-1]:]]


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_user_serves_every_address_and_checks_readiness(monkeypatch) -> None:
    final = instructions()
    user = [args for kind, args in final if kind == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0", "the server runs as a numeric, non-root user"
    health = next(args for kind, args in final if kind == "HEALTHCHECK")
    assert "/readyz" in health
    env = dict(part.split("=", 1) for kind, args in final if kind == "ENV" for part in args.split())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert (settings.host, settings.port, str(settings.models_dir)) == ("0.0.0.0", 8080, "/models")
    assert str(settings.cache_dir).startswith("/models/"), "downloads land in the volume, once"
    assert any(kind == "VOLUME" and "/models" in args for kind, args in final)


def test_the_wheel_the_image_installs_holds_the_runtime_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("hearth-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("hearth/web/index.html", "hearth/web/app.js", "hearth/web/mic-worklet.js",
                   "hearth/runner/hearth.proto", "hearth/gallery/hub.yaml", "hearth/runner/hearth_pb2.py"):
        assert needed in names, needed
