#!/usr/bin/env bash
# Set up (idempotently, with the dev extra) and run the whole test suite plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check fitllm benchmarks tests
exec .venv/bin/python -m pytest "$@"
