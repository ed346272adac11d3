"""The fused int8 and int4 weight-only matmuls for CUDA (fitllm.quant.triton_matmul.py), run in Triton's interpreter on
CPU (conftest sets TRITON_INTERPRET=1 without CUDA), against the layer's own dequantized weight."""

from __future__ import annotations

import pytest
import torch
from test_quant_layers import BF16_TOL, QUANT_TOL, _build, _randn, _rel

from fitllm.quant.int4 import Int4Method
from fitllm.quant.int8 import Int8Method, quantize_int8
from fitllm.quant.triton_matmul import int4_matmul, int8_matmul


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 100, 300), (7, 64, 128), (16, 33, 130), (40, 96, 200), (70, 48, 64)]
)
def test_int8_matmul_matches_the_dequantized_product_float32(m, n, k):
    w = _randn(n, k, seed=m)
    q, scale = quantize_int8(w)
    x = _randn(m, k, seed=m + 1)
    out = int8_matmul(x, q, scale.float())
    ref = x @ (q.float() * scale.float()[:, None]).T
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6
    assert _rel(out, x @ w.T) < QUANT_TOL["int8"]  # and it is the quantized weight, not a copy of w
    assert _rel(out, x @ w.T) > 1e-4


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
def test_int8_matmul_on_a_loaded_layer_bfloat16(kind):
    """The kernel takes Int8Method's parameters as they are (int8 weight [N, K], scale [N] in the model dtype)."""
    layer, w = _build(kind, Int8Method(), torch.bfloat16)
    deq = layer.quant.dequantize(layer)
    for rows in (1, 5, 33):
        x = _randn(rows, layer.in_features, seed=rows).to(torch.bfloat16)
        out = int8_matmul(x, layer.weight, layer.weight_scale)
        assert out.dtype == torch.bfloat16
        assert _rel(out, x.float() @ deq.T) < BF16_TOL
        assert _rel(out, layer(x)) < BF16_TOL  # the CPU path gives the same product


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_on_a_loaded_layer(kind, dtype):
    """The plain layout as Int4Method stores it off the CPU kernel (GPU layers keep it), against the layer's
    dequantized weight: a wrong nibble order, group index or zero convention gives errors of order 1."""
    method = Int4Method(32)
    layer, w = _build(kind, method, dtype, finish=False)
    assert not layer.int4_kernel_layout
    deq = method.dequantize(layer)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    for rows in (1, 9, 40):
        x = _randn(rows, layer.in_features, seed=rows + 3).to(dtype)
        out = int4_matmul(x, layer.weight, layer.weight_scale_zeros, 32)
        assert out.dtype == dtype and out.shape == (rows, w.shape[0])
        assert _rel(out, x.float() @ deq.T) < tol
        assert _rel(out, x.float() @ w.T) < QUANT_TOL["int4"]
