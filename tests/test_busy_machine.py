"""A runner under load it did not start gives up the thread it cannot have, and takes it back once the cores are
free; the text it generates at temperature 0 is the same either way. (The speed is measured in
benchmarks/busy_machine.py, not here.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HearthServer, install_cached, write_yaml

pytestmark = pytest.mark.real_model


def test_threads_follow_outside_load_and_the_output_does_not_change(start_server, smollm2_file: Path,
                                                                    tmp_path: Path) -> None:
    """The server is told not to adapt (--no-adapt-threads); one model's YAML turns it back on, the other's follows
    the server: only the first gives up a thread."""
    install_cached(tmp_path, smollm2_file, "smollm2.gguf")
    write_yaml(tmp_path, "smollm2", {"name": "smollm2", "parameters": {"model": "smollm2.gguf"}, "context_size": 1024,
                                     "adapt_threads": True})
    write_yaml(tmp_path, "fixed", {"name": "fixed", "parameters": {"model": "smollm2.gguf"}, "context_size": 1024})
    server: HearthServer = start_server(tmp_path, "--no-adapt-threads")  # (--threads 2, as every test server)
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 64, "extra_body": {"ignore_eos": True},
            "messages": [{"role": "user", "content": "Tell me about the sea."}]}
    fixed = {**body, "model": "fixed", "max_tokens": 4}
    quiet = server.client().chat.completions.create(**body).choices[0].message.content
    server.client().chat.completions.create(**fixed)
    start = len(server.log())  # (the log from here on: what the runners said under the loads)
    loads = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = []
        deadline = time.monotonic() + 60
        while "computing with 1 of 2 threads" not in server.log()[start:] and time.monotonic() < deadline:
            busy.append(server.client().chat.completions.create(**body).choices[0].message.content)
        assert "[smollm2] INFO computing with 1 of 2 threads" in server.log()[start:], \
            "the runner kept both threads under two busy loops"
        busy.append(server.client().chat.completions.create(**body).choices[0].message.content)
        for _ in range(2):  # each long enough to be judged (tenths of a second of computing)
            server.client().chat.completions.create(**fixed)
    finally:
        for load in loads:
            load.kill()
            load.wait()
    assert "[fixed] INFO computing with" not in server.log(), "a model the server told not to adapt gave up a thread"
    assert all(text == quiet for text in busy), "the output changed with the thread count"
    start = len(server.log())
    deadline = time.monotonic() + 60
    while "computing with all 2 threads again" not in server.log()[start:] and time.monotonic() < deadline:
        assert server.client().chat.completions.create(**body).choices[0].message.content == quiet
    assert "computing with all 2 threads again" in server.log()[start:]
