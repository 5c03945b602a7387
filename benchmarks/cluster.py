"""Replicas on a Ray cluster: eight streams on one replica with 2 threads against two replicas with 1 thread each.

Starts a Ray cluster on this machine (`ray start`: a head with no CPUs, two workers with 2 CPUs and one `slot`
each), and Hearth with `--ray` in front of it. Model `one` is a single replica with 2 threads; model `two` is two
replicas with 1 thread each, one per worker (each asks for a `slot`). Rounds alternate: load one, eight streams,
unload; load the other, eight streams, unload. The rate is completion tokens over the wall time of the eight.

    python benchmarks/cluster.py [--model smollm2-135m-instruct] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import concurrent_streams, free_port, install, machine_line, stop, wait_http

RAY = str(Path(sys.executable).parent / "ray")


def start_cluster(root: Path) -> tuple[str, list[subprocess.Popen]]:
    """A head with no CPUs and two workers with 2 CPUs and a `slot` each, started one after another (two raylets
    starting at once on one machine may pick the same free port)."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    root.mkdir(parents=True)
    nodes: list[subprocess.Popen] = []
    for index, extra in enumerate([["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                                    f"--temp-dir={root}"],
                                   [f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"slot": 1}'],
                                   [f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"slot": 1}']]):
        log = root / f"node{index}.log"
        with log.open("w") as out:
            nodes.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *extra], stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env))
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if nodes[-1].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Ray node {index} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
    return f"127.0.0.1:{port}", nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    print(machine_line(model=args.model, streams=args.streams, tokens=args.tokens, rounds=args.rounds))
    root = Path(tempfile.mkdtemp(prefix="hb", dir="/tmp"))
    models = root / "models"
    models.mkdir()
    install(models, args.model)
    base_yaml = (models / f"{args.model}.yaml").read_text()
    (models / f"{args.model}.yaml").unlink()
    (models / "one.yaml").write_text(base_yaml.replace(f"name: {args.model}", "name: one")
                                     + "threads: 2\ncontext_size: 4096\nparallel: 8\n")
    (models / "two.yaml").write_text(base_yaml.replace(f"name: {args.model}", "name: two")
                                     + "threads: 1\ncontext_size: 4096\nparallel: 4\nreplicas: 2\n"
                                       "resources: {slot: 1}\n")
    address, nodes = start_cluster(root / "ray")
    port = free_port()
    hearth = subprocess.Popen([sys.executable, "-m", "hearth", "serve", "--models-dir", str(models), "--port",
                               str(port), "--ray", address, "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    rates: dict[str, list[float]] = {"one": [], "two": []}
    try:
        wait_http(base, hearth)
        for round_ in range(args.rounds):
            for name in ("one", "two"):
                httpx.post(f"{base}/runners/load", json={"model": name}, timeout=300).raise_for_status()
                concurrent_streams(base, name, 2, 8)  # warm-up: every replica has read a prompt
                rate, _ = concurrent_streams(base, name, args.streams, args.tokens)
                placed = [(r["replica"], r["node_id"][:8]) for r in httpx.get(f"{base}/runners").json()["runners"]
                          if r["name"] == name]
                httpx.post(f"{base}/runners/unload", json={"model": name}, timeout=60).raise_for_status()
                time.sleep(2)  # the replicas' actors give their CPUs back
                rates[name].append(rate)
                print(f"round {round_ + 1} {name}: {rate:.1f} tok/s  replicas on {json.dumps(placed)}", flush=True)
        one, two = statistics.median(rates["one"]), statistics.median(rates["two"])
        print(f"median: one replica, 2 threads {one:.1f} tok/s; two replicas on two nodes, 1 thread each "
              f"{two:.1f} tok/s ({two / one:.2f}x)")
    finally:
        stop(hearth)
        for node in nodes:
            subprocess.run(["pkill", "-KILL", "-s", str(node.pid)], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
