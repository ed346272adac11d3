"""What a started server process holds that it has no use for (issue 24's serving target is peak RSS at or
below llama-server's): each check runs a fresh interpreter, as `fitllm serve` is one, on the default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Imported by nothing a CPU server runs; each one cost RSS for the process's life when it was:
# torch.profiler pulled in torch._dynamo, torch._inductor and triton (+150 MiB, 70 MiB of it libtriton.so);
# torch.empty_like of meta tensors pulled in sympy and torch.fx's symbolic shapes (+36 MiB).
UNUSED = ("triton", "torch._dynamo", "torch._inductor", "sympy", "torch.fx.experimental.symbolic_shapes",
          "transformers")  # fmt: skip

_SERVE_PATH = """
import json, sys
from fitllm import Engine, EngineConfig, SamplingParams
from fitllm.loader import open_model
from fitllm.server.app import build_app

source = open_model(None)
engine = Engine(EngineConfig(max_model_len=256, max_num_seqs=2, quantization="int4"), source=source)
engine.add_request([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
while engine.has_unfinished_requests():
    engine.step()
maps = open("/proc/self/maps").read()
print(json.dumps({"modules": sorted(m for m in UNUSED if m in sys.modules),
                  "gguf_mapped": str(source.path.resolve()) in maps,
                  "libtriton_mapped": "libtriton" in maps}))
"""


@pytest.fixture(scope="module")
def serve_path() -> dict:
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    code = f"UNUSED = {UNUSED!r}\n" + _SERVE_PATH
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_serve_path_imports_no_compiler_stack(serve_path):
    """Start-up (load, profile step, KV pool) and a request import none of the modules no CPU server uses."""
    assert serve_path["modules"] == []
    assert not serve_path["libtriton_mapped"]


def test_the_served_model_file_is_not_mapped(serve_path):
    """After start-up the process holds no mapping of the GGUF (its pages would count in RSS)."""
    assert not serve_path["gguf_mapped"]
