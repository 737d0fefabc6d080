#!/usr/bin/env bash
# The whole test suite, on a CPU, offline. Installs what it needs first (scripts/bootstrap.sh, scripts/browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/browser.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest "$@"
