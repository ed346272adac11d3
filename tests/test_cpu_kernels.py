"""fitllm's own CPU kernel (fitllm/quant/kernels/int8_vnni.c, built by fitllm/quant/cpu_kernels.py): its
numbers against a float64 reference and against PyTorch's int8 kernel, the shapes it must cover (a K tail
that is not a multiple of 64, every remainder of its 2-row x 4-column blocks), and where Int8Method uses it."""

from __future__ import annotations

import pytest
import torch

from fitllm.quant import cpu_kernels
from fitllm.quant.cpu_kernels import int8_gemm_op, int8_kernel
from fitllm.quant.int8 import Int8Method, int8_path, kernel_rows, quantize_int8

needs_kernel = pytest.mark.skipif(
    int8_kernel() is None, reason="no AVX-512 VNNI CPU or C compiler here: fitllm's int8 kernel is not built"
)


def _case(n: int, k: int, m: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, k // 2] = 40.0  # an outlier feature, as hidden states have: the row's scale follows it
    return x, q, scale


def _bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|y - x W^T| allowed per element: the two-part activation (each element within max|x_row| / 64516)
    times the row's sum of |w|."""
    w = q.double() * scale.double()[:, None]
    return x.double().abs().amax(1, keepdim=True) / 64516 * w.abs().sum(1)


@needs_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (7, 1000), (33, 64), (130, 70), (5, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_int8_kernel_float32_within_its_activation_bound(n, k, m):
    x, q, scale = _case(n, k, m, torch.float32, seed=n + k + m)
    got = int8_kernel()(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    err = (got.double() - want).abs()
    assert (err <= _bound(x, q, scale) + 1e-5 * want.abs() + 1e-6).all()
    # Not trivially within it: the activations were quantized (a float32 matmul is ~1e-7 off).
    assert err.max() > 1e-6


@needs_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (960, 576), (576, 1536), (49, 128)])
@pytest.mark.parametrize("m", [1, 4, 7])
def test_int8_kernel_bfloat16_matches_pytorchs_int8_kernel(n, k, m):
    """bfloat16 activations and scales, bfloat16 out: as close to aten._weight_int8pack_mm as two roundings
    to bfloat16 (each 2^-9 relative) allow."""
    x, q, scale = _case(n, k, m, torch.bfloat16, seed=7 * n + m)
    s16 = scale.bfloat16()
    got = int8_kernel()(x, q, s16)
    ref = torch.ops.aten._weight_int8pack_mm(x, q, s16)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    exact = x.double() @ (q.double() * s16.double()[:, None]).T
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + _bound(x, q, s16) + 1e-3).all()
    assert ((got.double() - ref.double()).abs() <= 2**-7 * exact.abs() + _bound(x, q, s16) + 1e-3).all()


@needs_kernel
def test_int8_kernel_zero_row_and_mixed_dtypes():
    x, q, scale = _case(64, 192, 3, torch.bfloat16, seed=1)
    x[1] = 0
    got = int8_kernel()(x, q, scale)  # bfloat16 activations, float32 scales
    assert torch.equal(got[1], torch.zeros(64, dtype=torch.bfloat16))
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    assert ((got.double() - want).abs() <= 2**-8 * want.abs() + _bound(x, q, scale) + 1e-3).all()


@needs_kernel
def test_int8_method_takes_the_kernel_for_small_calls_only():
    cpu = torch.device("cpu")
    small = 576 * 576
    assert int8_path(cpu, 1, small, True, vnni=True) == "vnni"
    assert int8_path(cpu, 1, small, False, vnni=True) == "vnni"  # any of its dtypes, unlike aten's
    assert int8_path(cpu, kernel_rows(small) - 1, small, True, vnni=True) == "vnni"
    assert int8_path(cpu, kernel_rows(small), small, True, vnni=True) == "scratch"
    assert int8_path(cpu, 1, small, True, vnni=False) == "aten"
    method, layer = Int8Method(), torch.nn.Module()
    method.create_weights(layer, 96, 128)
    method.load_rows(layer, 0, torch.randn(96, 128))
    layer.weight_scale.data = layer.weight_scale.data.bfloat16()
    x = torch.randn(2, 128).bfloat16()
    assert torch.equal(method.apply(layer, x), int8_kernel()(x, layer.weight, layer.weight_scale))
    assert method.scratch.buffer is None
    assert not int8_kernel().takes(x.t(), layer.weight, layer.weight_scale)  # strided: another path
    compiled = torch.compile(lambda a: int8_gemm_op(a, layer.weight, layer.weight_scale), fullgraph=True)
    assert torch.equal(compiled(x), method.apply(layer, x))  # an operator in a graph, no break


def test_int8_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FITLLM_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "_kernel", [])
    assert cpu_kernels.int8_kernel() is None
    method, layer = Int8Method(), torch.nn.Module()
    method.create_weights(layer, 64, 64)
    method.load_rows(layer, 0, torch.randn(64, 64))
    x = torch.randn(1, 64)
    assert torch.equal(
        method.apply(layer, x), torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
    )
