"""Every Triton kernel compiled for sm_90 (an H100/H200) on this CPU machine: benchmarks/kernel_compile.py's
`ci` matrix, in a process of its own (this one runs Triton in interpreter mode). A compile error, a register
spill, or attention K/V loads that are not vectorised fail the test. The `full` matrix (every axis crossed)
is `python -m benchmarks.kernel_compile --matrix full`.

Also the PTX reading itself, on hand-written snippets, so that a change of Triton's PTX spelling that makes
the checks blind shows here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_compile as kc

ROOT = Path(__file__).resolve().parent.parent
PTXAS = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")
def test_every_kernel_compiles_for_sm90_with_vectorised_kv_loads(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "compile.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_compile", "--matrix", "ci", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    kernels = {r["kernel"] for r in records}
    assert kernels == {
        "_write_kv_kernel",
        "_paged_attention_kernel",
        "_combine_splits_kernel",
        "_weight_only_matmul_kernel",
        "_add_rmsnorm_kernel",
        "_silu_mul_kernel",
    }
    for r in records:
        if r["kernel"] == "_paged_attention_kernel" and r["params"]["kv"] == "auto":
            # 16-byte K/V loads (async copies, pipelined) and nothing narrower than the block-table gather.
            assert r["loop_loads"].get("16", 0) >= 2 and r["num_stages"] >= 2, r
            assert all(int(w) >= 4 for w in r["loop_loads"]), r
        if r["kernel"] == "_paged_attention_kernel":
            assert all(int(w) >= 4 for w in r["loop_loads"]), r  # quantized: 4-byte words (rows are D + 4)
    assert {r["params"]["head_dim"] for r in records if r["kind"] == "attention"} >= {64, 128, 256}
    assert {r["params"]["kv"] for r in records if r["kind"] == "attention"} == {
        "auto",
        "int8",
        "fp8",
        "fp8-bits",
    }


PTX = """
.visible .entry k(
)
{
	ld.global.b32 	%r1, [%rd1];
$L__BB0_2:
	ld.global.b16 	%rs1, [%rd2];
	@%p1 cp.async.cg.shared.global [ %r144 + 0 ], [ %rd47 + 0 ], 0x10, %r145;
	ld.global.v4.b32 	{%r2, %r3, %r4, %r5}, [%rd3];
	@%p2 bra $L__BB0_2;
	bra.uni $L__BB0_5;
$L__BB0_5:
	ld.global.L1::evict_last.v2.b16 	{%rs2, %rs3}, [%rd4];
	ret;
}
"""


def test_ptx_loads_are_sorted_by_width_and_loop():
    total, looped = kc.global_loads(PTX)
    assert dict(total) == {4: 2, 2: 1, 16: 2}
    assert dict(looped) == {2: 1, 16: 2}  # the forward branch to $L__BB0_5 is no loop


def test_a_narrow_loop_load_in_attention_is_a_problem():
    record = dict(
        kernel="_paged_attention_kernel",
        spill_stores=0,
        spill_loads=0,
        stack=0,
        constexprs={"ALIGN": 8},
        loop_loads={"2": 32, "4": 2},
    )
    found = kc.problems(kc.AttentionCase(), record)
    assert any("narrower than 4 bytes" in p for p in found) and any("no 16-byte" in p for p in found)
    assert kc.problems(kc.AttentionCase(), dict(record, loop_loads={"16": 4, "4": 3})) == []
    assert kc.problems(kc.AttentionCase(), dict(record, loop_loads={"16": 4}, spill_stores=8))
