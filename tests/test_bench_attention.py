"""`fitllm bench attention`'s logic: the three decode paths it times (the previous bmm, PyTorch's, fitllm's
kernel) agree on the same case, and the kernel path switches the kernel on only for itself."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import cpu_attention
from fitllm.model.attention import cpu_decode


def test_bench_attention_times_three_paths_that_agree(tmp_path, monkeypatch):
    if cpu_decode.decode_attention_kernel() is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    calls = []
    original = cpu_decode.DecodeAttentionKernel.__call__
    monkeypatch.setattr(
        cpu_decode.DecodeAttentionKernel, "__call__", lambda self, *a: calls.append(1) or original(self, *a)
    )
    p = argparse.ArgumentParser()
    cpu_attention.add_arguments(p)
    out = tmp_path / "attention.json"
    args = p.parse_args(["--contexts", "40", "--batches", "1,3", "--calls", "2", "--rounds", "1",
                         "--json", str(out)])  # fmt: skip
    assert cpu_attention.run(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 40), (3, 40)]
    for r in rows:
        assert set(r["us_median"]) == {"bmm (previous)", "torch", "kernel"}
        assert r["max_abs_diff"] < 0.05  # bfloat16 outputs of the same attention
    # Each case: one output check and 2 timed calls (--calls 2, one round) through the kernel; none through
    # the torch path.
    assert len(calls) == 2 * (1 + 2)
    assert cpu_decode._kernel[0] is not None  # restored after the torch path's run
