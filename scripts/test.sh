#!/usr/bin/env bash
# Set up (idempotently, with the dev extra) and run the whole test suite plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# The studio's browser test drives Debian's Chromium through Playwright (no browser download).
if [[ ! -x /usr/bin/chromium ]]; then
  sudo_=""; [[ "$(id -u)" != 0 ]] && sudo_="sudo"
  $sudo_ apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
    $sudo_ apt-get update -q >/dev/null && $sudo_ apt-get install -y -q chromium chromium-driver >/dev/null
  }
fi
.venv/bin/ruff check fitllm benchmarks tests
# Test files spread over the cores (2 on CI); a file stays on one worker, so its module fixtures load once.
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
