"""Fused elementwise kernels for CUDA (Triton): residual add + RMSNorm, and SiLU(gate) * up.

A decoder layer's small kernels cost more in launches and round trips through memory than in arithmetic at
decode sizes (issue 23: ~40 kernels per layer). torch runs RMSNorm with a residual as five kernels (add, cast,
square-mean, rsqrt-scale, weight) and SwiGLU as three (chunk views, silu, mul); these run each as one,
reading every input once. They round where the torch references (`RMSNorm.forward`, `SiluAndMul.forward` in
layers.py) round: the residual sum and the normalised row to the model dtype before the weight, SiLU's result
before the product, so outputs agree to the last bit up to the hardware's rsqrt and exp.

Used on contiguous CUDA tensors only (layers.py decides); tested against the references in Triton's interpreter on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * n + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = (h * tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n + cols, (w.to(tl.float32) * h.to(tl.float32)).to(dtype), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) as `RMSNorm.forward` gives them; x [..., n] contiguous."""
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if rows:
        _add_rmsnorm_kernel[(rows,)](
            x,
            residual.contiguous() if residual is not None else x,
            weight,
            out,
            res_out,
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 2048 else 8,
        )
    return out, res_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    tl.store(out_ptr + row * inter + cols, (act.to(tl.float32) * up).to(dtype), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of x [..., 2 * inter] = [gate | up], as `SiluAndMul.forward` gives it."""
    inter = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    if rows:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](x, out, inter, BLOCK=block)
    return out
