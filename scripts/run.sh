#!/usr/bin/env bash
# Set up (idempotently) and run the fitllm CLI: scripts/run.sh generate "Once upon a time"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fitllm "$@"
