"""Downloading a Hugging Face repository (a "snapshot"): what `parameters.model: owner/name` means for the
diffusers, transformers and sentence-transformers backends, and what LocalAI's `artifacts:` name.

The revision is resolved to its commit first, and every file comes from that commit, so the folder is one
consistent version. Each file is checked against the hub's listing: large (LFS) files by their sha256, small
ones by their git object id. Downloads go through the same code as every other (Range resume, `.partial` files,
the address rules), from `HF_ENDPOINT` when it is set. Only what a CPU runner loads is fetched: where a folder
holds safetensors, the same weights in other formats (`.bin`, `.ckpt`, `.pt`, ONNX, Flax, TensorFlow) are skipped,
as are a diffusers repository's single-file checkpoints at its top and half-precision variants beside full ones.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from hearth.gallery.download import DownloadError, Sources, Transfer, download, fetch_small, safe_relative

MAX_LISTING_BYTES = 16 * 2**20
MAX_FILES = 5_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5",
                   ".ot", ".tflite", ".gguf")
NEVER = (".gitattributes", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.mlmodel",
         "*.mlpackage/*", "onnx/*", "openvino/*", "coreml/*", "flax_model*", "tf_model*", "rust_model*")


@dataclass
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    git_oid: str  # every file


HINTS = {401: "the repository is gated or private; set HF_TOKEN to a token that may read it",
         403: "the repository is gated or private; set HF_TOKEN to a token that may read it",
         404: "no such repository or revision on the hub"}


async def _get_json(client: httpx.AsyncClient, url: str, sources: Sources, headers: dict[str, str]) -> tuple[Any, str]:
    """The JSON at `url` and the URL of its next page (from a Link header), if any."""
    body, links = await fetch_small(client, url, sources, MAX_LISTING_BYTES, headers=headers, hints=HINTS)
    try:
        return json.loads(body), links.get("next", {}).get("url", "")
    except ValueError:
        raise DownloadError(f"{url} did not answer JSON") from None


async def list_files(repo: str, revision: str, sources: Sources) -> tuple[str, list[HubFile]]:
    """The commit `revision` resolves to, and every file of the repository at that commit."""
    base = sources.hf_endpoint
    headers = {"Authorization": f"Bearer {sources.hf_token}"} if sources.hf_token else {}
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=30) as client:
        info, _ = await _get_json(client, f"{base}/api/models/{repo}/revision/{quote(revision, safe='')}",
                                  sources, headers)
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not commit:
            raise DownloadError(f"the hub did not say which commit {repo}@{revision} is")
        files: list[HubFile] = []
        url = f"{base}/api/models/{repo}/tree/{commit}?recursive=true"
        while url:
            page, url = await _get_json(client, url, sources, headers)
            if not isinstance(page, list):
                raise DownloadError(f"the hub's file list for {repo} is not a list")
            for item in page:
                if not isinstance(item, dict) or item.get("type") != "file":
                    continue
                lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else {}
                files.append(HubFile(path=str(item.get("path", "")), size=int(item.get("size") or 0),
                                     sha256=str(lfs["oid"]) if lfs.get("oid") else None,
                                     git_oid=str(item.get("oid", ""))))
                if len(files) > MAX_FILES:
                    raise DownloadError(f"{repo} has more than {MAX_FILES} files; refused")
    return commit, files


def choose(files: list[HubFile], allow: list[str] | None = None, ignore: list[str] | None = None) -> list[HubFile]:
    """The files a CPU runner needs (see the module docstring); `allow` and `ignore` patterns (fnmatch, as
    LocalAI's artifacts take them) narrow it further."""
    paths = {f.path for f in files}
    diffusers = "model_index.json" in paths
    chosen = []
    for item in files:
        path = PurePosixPath(item.path)
        name, folder = path.name, str(path.parent)
        if any(fnmatch.fnmatch(item.path, pattern) or fnmatch.fnmatch(name, pattern) for pattern in NEVER):
            continue
        siblings = [PurePosixPath(p) for p in paths if str(PurePosixPath(p).parent) == folder]
        weight = path.suffix in WEIGHT_SUFFIXES
        if weight and path.suffix != ".safetensors" and any(s.suffix == ".safetensors" for s in siblings):
            continue
        if weight and diffusers and folder == ".":
            continue  # a diffusers repository's single-file checkpoints: the pipeline loads its subfolders
        plain = name.replace(".fp16.", ".").replace(".non_ema.", ".").replace(".ema.", ".")
        if weight and plain != name and str(PurePosixPath(folder) / plain).removeprefix("./") in paths:
            continue  # a variant beside the full-precision file
        if weight and ".non_ema." in name:
            continue
        chosen.append(item)
    if allow:
        chosen = [f for f in chosen if any(fnmatch.fnmatch(f.path, p) for p in allow)]
    if ignore:
        chosen = [f for f in chosen if not any(fnmatch.fnmatch(f.path, p) for p in ignore)]
    return chosen


async def snapshot(repo: str, revision: str, folder: Path, sources: Sources, transfer: Transfer, written: list[Path],
                   on_progress: Callable[[Transfer], None] | None = None, cancelled: Callable[[], bool] = lambda: False,
                   allow: list[str] | None = None, ignore: list[str] | None = None) -> str:
    """Download `repo` at `revision` into `folder`; returns the commit. `written` gets each file as it is placed,
    so a caller can take them away again when a later one fails."""
    commit, files = await list_files(repo, revision, sources)
    wanted = choose(files, allow, ignore)
    if not wanted:
        raise DownloadError(f"{repo} has no files a CPU runner can load")
    transfer.total += sum(f.size for f in wanted)
    base_done = transfer.done
    for item in wanted:
        relative = safe_relative(item.path, what=f"{repo} file")
        target = folder / relative
        owner, name = repo.split("/", 1)
        uri = f"huggingface://{owner}/{name}@{commit}/{item.path}"  # sent with HF_TOKEN, as every hub download
        # The total is known from the listing: the download adds each response's length again, so take it back.
        before = transfer.total
        await download([uri], target, item.sha256, sources, on_progress, cancelled, transfer,
                       git_blob=None if item.sha256 else (item.git_oid, item.size))
        transfer.total = before
        written.append(target)
    transfer.done = base_done + sum(f.size for f in wanted)
    return commit
