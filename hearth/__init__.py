"""Hearth: a self-hosted AI server."""

import os

# The API process starts runner processes while gRPC's threads are busy; gRPC's fork handlers are of no use to
# a child that immediately execs, and they only log a warning. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# gRPC's newer EventEngine moves every message of a token stream through a pool of its own threads: about 190
# thread wake-ups a second in the API process and 140 in the runner for one stream, each taking a core from
# llama.cpp's decode threads. gRPC's older polling does the same work in the thread that waits for it (about 35 and
# 15 a second), and streamed generation runs about 2% faster over HTTP (benchmarks/README.md). Runners inherit it.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)

__version__ = "0.1.0"
