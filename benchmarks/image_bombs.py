"""The API process's memory under image bombs: eight requests at once, each with a 12000x12000 PNG (about 440 KB,
144 megapixels) as a data URL, to a vision model (the fake backend with `vision: true`).

Prints the API process's resident memory when idle, its peak during the requests (sampled every 20 ms) and a
second after them, and the answers' status codes. `--env KEY=VALUE` sets server settings (for instance
HEARTH_IMAGE_MAX_MEGAPIXELS=150 to let the images in); `--checkout DIR` runs the API process from another checkout
of Hearth (a baseline), its runners from this one.

    python benchmarks/image_bombs.py
    python benchmarks/image_bombs.py --env HEARTH_IMAGE_MAX_MEGAPIXELS=150
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

# Runs `python -m hearth` with DIR first on the path, past the editable install's finder.
FROM_CHECKOUT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
                 "sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('hearth', run_name='__main__', alter_sys=True)")


def rss_mb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) // 1024


def bomb() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12000, 12000), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--checkout")
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp())
    (models / "seer.yaml").write_text(yaml.safe_dump({"name": "seer", "backend": "fake", "fake": {"vision": True}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.update(item.split("=", 1) for item in args.env)
    start = [sys.executable, "-c", FROM_CHECKOUT, args.checkout] if args.checkout else [sys.executable, "-m", "hearth"]
    server = subprocess.Popen([*start, "serve", "--models-dir", str(models), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                httpx.get(base + "/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        url = bomb()
        body = {"model": "seer", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        httpx.post(base + "/v1/chat/completions", timeout=60, json={"model": "seer", "max_tokens": 2, "messages": [
            {"role": "user", "content": "warm up"}]})
        time.sleep(1)
        idle = peak = rss_mb(server.pid)
        statuses: list[int] = []
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(server.pid))
                time.sleep(0.02)

        def send() -> None:
            statuses.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=600).status_code)

        watcher = threading.Thread(target=watch)
        watcher.start()
        senders = [threading.Thread(target=send) for _ in range(8)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        time.sleep(1)
        done.set()
        watcher.join()
        after = rss_mb(server.pid)
        print(f"{args.checkout or 'this checkout'} {' '.join(args.env)}: idle {idle} MB, peak {peak} MB "
              f"(+{peak - idle}), after {after} MB (+{(after - idle) / idle:.0%}), answers {dict(Counter(statuses))}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
