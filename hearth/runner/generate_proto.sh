#!/usr/bin/env bash
# Regenerate the committed gRPC modules from hearth.proto (needs grpcio-tools: pip install -e '.[test]').
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. hearth/runner/hearth.proto
