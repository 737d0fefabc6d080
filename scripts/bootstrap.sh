#!/usr/bin/env bash
# Create .venv (if missing) and install characonsist with its test tools.
# torch==2.13.0 is installed first: on this project's machines it is the CPU build on disk; any other
# route makes pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
