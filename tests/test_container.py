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


# -- the KubeRay example ----------------------------------------------------------------------------------------

KUBERAY = ROOT / "deploy" / "kuberay" / "hearth.yaml"
RAYCLUSTER_CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayclusters.yaml.gz"


def _unknown_fields(value: object, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune as unknown (a structural schema's rule, which JSON Schema's validation
    does not check: a typo'd field would be dropped silently)."""
    if isinstance(value, dict) and "properties" in schema:
        found = [f"{path}.{key}" for key in value if key not in schema["properties"]
                 and not schema.get("x-kubernetes-preserve-unknown-fields")]
        return found + [miss for key, item in value.items() if key in schema["properties"]
                        for miss in _unknown_fields(item, schema["properties"][key], f"{path}.{key}")]
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [miss for key, item in value.items()
                for miss in _unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [miss for i, item in enumerate(value) for miss in _unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def test_the_kuberay_manifests_pass_their_schemas() -> None:
    """The RayCluster against KubeRay's CRD (tests/data/kuberay), its pod templates and the other objects against
    Kubernetes' own schemas (kubernetes-validate, strict: unknown fields are errors)."""
    import gzip

    import jsonschema
    import kubernetes_validate
    import yaml

    version = kubernetes_validate.latest_version()
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert sorted(d["kind"] for d in documents) == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"]
    crd = yaml.safe_load(gzip.decompress(RAYCLUSTER_CRD.read_bytes()))
    for document in documents:
        if document["kind"] != "RayCluster":
            kubernetes_validate.validate(document, version, strict=True)
            continue
        served = next(v for v in crd["spec"]["versions"] if f"ray.io/{v['name']}" == document["apiVersion"])
        schema = served["schema"]["openAPIV3Schema"]
        jsonschema.validate(document, schema)
        assert not _unknown_fields(document, schema)
        spec = document["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "pod"},
                                          "template": group["template"]}, version, strict=True)


def test_the_kuberay_example_fits_together() -> None:
    """The API joins the RayCluster's head service, every pod mounts the one models volume, all run the same image
    as a user, and the Ray version is the one Hearth's `ray` extra pins."""
    import tomllib

    import yaml

    documents = {d["kind"]: d for d in yaml.safe_load_all(KUBERAY.read_text())}
    cluster, api = documents["RayCluster"], documents["Deployment"]
    pinned = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                  ["optional-dependencies"]["ray"] if r.startswith("ray=="))
    assert cluster["spec"]["rayVersion"] == pinned.removeprefix("ray==")
    pods = [cluster["spec"]["headGroupSpec"]["template"], *(g["template"] for g in cluster["spec"]["workerGroupSpecs"]),
            api["spec"]["template"]]
    claim = documents["PersistentVolumeClaim"]["metadata"]["name"]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        container = pod["spec"]["containers"][0]
        models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
        assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert len({pod["spec"]["containers"][0]["image"] for pod in pods}) == 1
    command = " ".join(api["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"--address={cluster['metadata']['name']}-head-svc:6379" in command and "--num-cpus=0" in command
    assert "--ray auto" in command
    service = documents["Service"]
    assert service["spec"]["selector"] == api["spec"]["template"]["metadata"]["labels"]
