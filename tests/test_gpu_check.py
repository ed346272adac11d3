"""scripts/gpu_check.sh, the bounded GPU runbook, dry-run on CPU with tiny sizes (its documented
DEVCHECK_DEVICE=cpu mode), so that the script and its helpers (scripts/gpu_check/) never rot: every step runs
its command line, writes its JSON lines, and the summary reads them. The figures mean nothing on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRY_RUN = {
    "DEVCHECK_DEVICE": "cpu",
    "DEVCHECK_SMALL": "tiny",
    "DEVCHECK_BIG": "tiny",
    "DEVCHECK_TESTS_A": "tests/test_cuda_check.py",
    "DEVCHECK_TESTS_B": "tests/test_cuda_check.py",
    "DEVCHECK_ROOF_EXTRA": "--prompt-tokens 16 --decode-tokens 4",
    "DEVCHECK_TPUT_EXTRA": "--num-requests 2 --max-tokens-cap 4",
    "DEVCHECK_MEM_EXTRA": "--num-requests 2 --concurrency 2 --timing-rounds 1 --max-model-len 512",
    "DEVCHECK_TRACE_MAX_TOKENS": "4",
    "TRITON_INTERPRET": "1",
}


def test_the_gpu_runbook_dry_runs_on_cpu(tmp_path):
    env = dict(
        os.environ, **DRY_RUN, PYTHON=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "w")
    )
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for step in ("tests", "micro", "roof1b", "roof8b", "tput1b", "mem1b"):
        assert f"[{step}] start" in summary, (step, summary)
        assert f"[{step}] SKIPPED" not in summary and f"[{step}] rc=124" not in summary, summary
    assert "[tests] rc first=0 second=0" in summary, summary
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"info", "attn_decode", "attn_prefill", "gemm", "checkpoint", "bandwidth", "decode"} <= kinds
    assert {"throughput", "memory", "memory_device"} <= kinds, kinds
    assert not [r for r in rows if r["kind"] == "step_error" or "error" in r], rows
    # Both attention variants (the alignment hint on and off) ran; the summary names them.
    assert {r["variant"] for r in rows if r["kind"] == "attn_decode"} == {"aligned", "unaligned"}
    assert "==== summary" in summary and "throughput N=64 fitllm" in summary
