"""Offload placement (fitllm/memory/offload/placement.py): which layers stream, the bytes each side holds, and the
predicted cost; checked against brute force and against the pipeline's definition."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitllm.memory.offload.placement import (
    OffloadEstimate,
    Placement,
    place_layers,
    predicted_step_seconds,
    predicted_tokens_per_s,
    spread_evenly,
)

MB = 1 << 20


@given(n=st.integers(1, 120), data=st.data())
@settings(max_examples=200, deadline=None)
def test_spread_evenly_picks_distinct_evenly_spaced_layers(n, data):
    k = data.draw(st.integers(0, n))
    picked = spread_evenly(n, k)
    assert len(picked) == len(set(picked)) == k and all(0 <= i < n for i in picked)
    assert list(picked) == sorted(picked)
    if k >= 2:  # gaps between picks differ by at most one layer
        gaps = [b - a for a, b in itertools.pairwise(picked)]
        assert max(gaps) - min(gaps) <= 1


def test_spread_is_not_a_block():
    assert spread_evenly(40, 10) == (2, 6, 10, 14, 18, 22, 26, 30, 34, 38)
    assert spread_evenly(40, 20)[:4] == (1, 3, 5, 7)  # every other layer, not the last 20


@given(
    n=st.integers(1, 60),
    layer=st.integers(1, 64),
    room=st.integers(0, 5000),
    prefetch=st.integers(1, 4),
)
@settings(max_examples=300, deadline=None)
def test_placement_keeps_the_most_layers_resident_that_fit(n, layer, room, prefetch):
    try:
        p = place_layers(n, layer, room, prefetch)
    except ValueError:
        # Refused only when not even the staging for the streamed layers fits.
        assert room < min(prefetch, n) * layer and n * layer > room
        return
    assert p.device_bytes <= room or not p.offloaded and p.resident_bytes <= room
    assert p.resident_bytes + p.offloaded_bytes == n * layer
    assert p.staging_bytes <= prefetch * layer  # bounded by the prefetch depth
    # Brute force: no placement with one more resident layer fits.
    r = p.resident_layers + 1
    if r <= n:
        assert (r + min(prefetch, n - r)) * layer > room or r == n and n * layer > room


def test_everything_resident_when_it_fits_and_forced_offload():
    assert place_layers(30, 10 * MB, 300 * MB).offloaded == ()
    forced = place_layers(30, 10 * MB, 300 * MB, force_offload_bytes=95 * MB)  # --cpu-offload-gb
    assert len(forced.offloaded) == 10 and forced.offloaded == spread_evenly(30, 10)
    with pytest.raises(ValueError, match="--memory-budget"):
        place_layers(30, 10 * MB, 5 * MB)
    with pytest.raises(ValueError, match="--offload-prefetch"):
        place_layers(30, 10 * MB, 300 * MB, prefetch=0)


def test_half_the_stack_offloaded_and_its_bytes():
    p = place_layers(40, 100 * MB, 2100 * MB, prefetch=1)  # 20 resident + 1 staging
    assert (p.resident_layers, len(p.offloaded)) == (20, 20)
    assert p.offloaded == tuple(range(1, 40, 2))
    assert (p.resident_bytes, p.offloaded_bytes, p.staging_bytes) == (2000 * MB, 2000 * MB, 100 * MB)


def test_predicted_cost_follows_the_pipeline():
    none = Placement(10, 100, (), 1)
    half = Placement(10, 100, spread_evenly(10, 5), 1)
    full = Placement(10, 100, tuple(range(10)), 2)
    bw, compute = 1000.0, 0.01  # a layer copies in 0.1 s, computes in 0.01 s: transfer-bound
    assert predicted_step_seconds(none, bw, compute) == pytest.approx(0.1)
    assert predicted_step_seconds(half, bw, compute) == pytest.approx(0.5 + 0.1)
    assert predicted_step_seconds(full, bw, compute) == pytest.approx(1.0 + 0.1)
    # Compute-bound: copies hide behind compute but for the pipeline fill.
    assert predicted_step_seconds(half, bw, 1.0) == pytest.approx(10.0 + 0.1)
    # One pass serves the batch: tokens/s grows with the batch while the copies dominate.
    assert predicted_tokens_per_s(half, bw, compute, batch=16) == pytest.approx(
        16 * predicted_tokens_per_s(half, bw, compute)
    )
    # Without a copy engine of its own (CPU tier), copies and compute take turns: their times add.
    assert predicted_step_seconds(half, bw, compute, overlap=False) == pytest.approx(0.1 + 0.5)
    assert predicted_step_seconds(half, bw, 1.0, overlap=False) == pytest.approx(10.0 + 0.5)
    assert predicted_step_seconds(none, bw, compute, overlap=False) == pytest.approx(0.1)
    assert OffloadEstimate(bw, 1e9, "file").overlap is False
    assert OffloadEstimate(bw, 1e9, "pinned host").overlap is True
    with pytest.raises(ValueError):
        predicted_step_seconds(half, 0.0, compute)


# ---- the planner with offload ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm9b():
    import json
    from pathlib import Path

    from fitllm.config import ModelConfig

    path = Path(__file__).parent / "fixtures" / "codegeex4-all-9b" / "config.json"
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


def test_plan_offloads_weights_that_do_not_fit_and_says_so(glm9b):
    import torch

    from fitllm.plan.memory_plan import make_plan

    GiB = 1 << 30
    estimate = OffloadEstimate(20e9, 3000e9, "pinned host")
    plan = make_plan(glm9b, "glm", torch.bfloat16, 12 * GiB, 8192, estimate=estimate)
    p = plan.placement
    assert plan.fits and p is not None and 0 < len(p.offloaded) < p.num_layers
    per_layer = plan.weights.per_layer
    # Resident + offloaded = all weights; the ledger-exact resident figure is what the engine reserves.
    assert plan.resident_weight_bytes + len(p.offloaded) * per_layer == plan.weights.total
    assert plan.fixed_bytes + plan.kv_bytes_per_request <= plan.budget
    assert plan.staging_bytes == 2 * p.layer_bytes  # default --offload-prefetch 2
    # Minimal: one layer more resident would not leave the automatic KV reserve (4096 tokens).
    reserve = 4096 * plan.kv_bytes_per_token
    assert plan.fixed_bytes + reserve <= plan.budget < plan.fixed_bytes + per_layer + reserve
    text = plan.table()
    assert "weights: offloaded (streamed)" in text and "predicted decode, batch 1 / 16" in text
    assert estimate.tokens_per_s(p, 1) < estimate.resident_tokens_per_s(p, 1)
    assert estimate.tokens_per_s(p, 16) == pytest.approx(16 * estimate.tokens_per_s(p, 1))
    # Weights that fit are never offloaded unless asked; --cpu-offload-gb forces it.
    roomy = make_plan(glm9b, "glm", torch.bfloat16, 40 * GiB, 8192)
    assert roomy.placement is not None and not roomy.placement.offloaded
    forced = make_plan(glm9b, "glm", torch.bfloat16, 40 * GiB, 8192, cpu_offload_gb=4.0)
    assert len(forced.placement.offloaded) == -(-4 * GiB // forced.placement.layer_bytes)


def test_plan_suggests_the_offload_that_fits_a_full_context(glm9b):
    import re

    import torch

    from fitllm.plan.memory_plan import make_plan

    GiB = 1 << 30
    plan = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072)
    assert not plan.fits
    line = next(s for s in plan.suggestions if s.startswith("--cpu-offload-gb"))
    gb = float(re.match(r"--cpu-offload-gb ([\d.]+)", line).group(1))
    assert make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, cpu_offload_gb=gb).fits
    assert not make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, cpu_offload_gb=gb - 0.5).fits
