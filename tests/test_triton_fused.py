"""The fused add + RMSNorm and SiLU * up kernels (fitllm/model/triton_fused.py) against the torch code they
replace on CUDA (`RMSNorm.forward`, `SiluAndMul.forward`), in Triton's interpreter on CPU (conftest sets
TRITON_INTERPRET=1) or natively on a GPU."""

from __future__ import annotations

import pytest
import torch

from fitllm.model import triton_fused as tf
from fitllm.model.layers import RMSNorm, SiluAndMul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bfloat16 within one rounding step (2^-8) natively; the interpreter (numpy has no bfloat16) rounds its
# float32 -> bfloat16 casts differently from torch, two steps apart at worst.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3 if DEVICE.type == "cuda" else 2e-2}


def _close(got, want, dtype):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96, 2048])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_matches_the_torch_norm(dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    x = (3 * torch.randn(5, hidden, generator=g)).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype) if with_residual else None
    want, want_res = norm(x, res)
    got, got_res = tf.add_rmsnorm(
        x.to(DEVICE), None if res is None else res.to(DEVICE), norm.weight.to(DEVICE), norm.eps
    )
    assert got.dtype == dtype and got.shape == x.shape
    _close(got, want, dtype)
    _close(got_res, want_res, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 1024, 1500])
def test_silu_mul_matches_the_torch_activation(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    x = (3 * torch.randn(2, 3, 2 * inter, generator=g)).to(dtype)
    want = SiluAndMul()(x)
    got = tf.silu_mul(x.to(DEVICE))
    assert got.shape == (2, 3, inter) and got.dtype == dtype
    _close(got, want, dtype)


def test_only_contiguous_cuda_tensors_take_the_kernels(monkeypatch):
    """The torch code stays on CPU; on CUDA the layers call the kernels (a recorder stands in for them)."""
    from fitllm.model import layers

    assert not layers._fused(torch.zeros(2, 4))
    calls = []
    monkeypatch.setattr(layers, "_fused", lambda x: True)
    monkeypatch.setattr(tf, "add_rmsnorm", lambda *a: calls.append("norm") or (a[0], a[0]))
    monkeypatch.setattr(tf, "silu_mul", lambda x: calls.append("silu") or x)
    norm = RMSNorm(4, 1e-5)
    norm(torch.zeros(2, 4), torch.zeros(2, 4))
    norm(torch.zeros(2, 4, dtype=torch.float16))  # the weight's dtype differs: torch code
    SiluAndMul()(torch.zeros(2, 8))
    assert calls == ["norm", "silu"]
