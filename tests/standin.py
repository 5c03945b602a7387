"""A stand-in for the hosts Hearth downloads from (raw.githubusercontent.com, the Hugging Face hub), on loopback.

It serves byte strings at paths (honouring Range requests, as the hub does; a path can be made to break off once,
or to redirect),
the hub's JSON API for the repositories it is given, and counts every request, so a test can say what was fetched
and how often.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.conftest import free_port


class StandIn:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.streams: dict[str, Callable[[], tuple[int, object]]] = {}  # path -> (length, iterable of chunks)
        self.hits: Counter[str] = Counter()
        self.flaky: set[str] = set()  # paths whose next whole-file answer breaks off halfway (once each)
        self.redirects: dict[str, str] = {}  # path -> where a 302 sends the client
        self.headers: list[tuple[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = unquote(urlsplit(self.path).path)
                outer.hits[path] += 1
                outer.headers.append((path, self.headers))  # an HTTPMessage: names match in any case
                if path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in outer.streams:
                    length, chunks = outer.streams[path]()
                    self.send_response(200)
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    try:
                        for chunk in chunks:  # type: ignore[attr-defined]
                            self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                body = outer.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                byte_range = self.headers.get("Range")
                start = int(byte_range.split("=")[1].split("-")[0]) if byte_range else 0
                self.send_response(206 if byte_range else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if byte_range:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if path in outer.flaky and not byte_range:
                    outer.flaky.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # cut off halfway: the client resumes with a Range request
                    return
                self.wfile.write(body[start:])

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        """Every request's path and Range header, in order."""
        return [(path, headers.get("Range")) for path, headers in self.headers]

    @property
    def authorizations(self) -> list[str | None]:
        return [headers.get("Authorization") for _, headers in self.headers]

    def hub_repo(self, repo: str, files: dict[str, bytes], commit: str = "c0ffee" * 6 + "abcd", lfs_over: int = 0) -> str:
        """Serve a Hugging Face repository as the hub does: its revision and file list under /api/models, its files
        under /REPO/resolve/COMMIT/PATH. Files larger than `lfs_over` bytes are listed as LFS (by sha256), the rest
        by their git blob id. Returns the commit."""
        self.files[f"/api/models/{repo}/revision/main"] = json.dumps(
            {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}).encode()
        listing = []
        for path, body in files.items():
            item = {"type": "file", "path": path, "size": len(body),
                    "oid": hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()}
            if len(body) > lfs_over:
                item["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 130}
            listing.append(item)
            self.files[f"/{repo}/resolve/{commit}/{path}"] = body
        self.files[f"/api/models/{repo}/tree/{commit}"] = json.dumps(listing).encode()
        return commit

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
