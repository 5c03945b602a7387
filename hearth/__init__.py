"""Hearth: a self-hosted AI server."""

import os

# The API process starts runner processes while gRPC's threads are busy; gRPC's fork handlers are of no use to
# a child that immediately execs, and they only log a warning. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
