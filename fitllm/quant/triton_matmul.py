"""Fused weight-only matmuls for CUDA (Triton), reading each quantized weight once.

int8: out = (x @ q^T) * s.

Decode on a GPU is bound by reading weights. Converting an int8 weight into a bfloat16 scratch before a cuBLAS
matmul reads 1 byte, writes 2 and reads 2 again per weight, more than bfloat16 alone. This kernel loads the
int8 tile, converts it in registers and accumulates in float32, so the weight costs 1 byte per element; the
per-output-channel scale is applied once to the accumulator. Int8Method uses it for calls of at most its
`TRITON_ROWS` rows (decode and small prefill chunks); larger calls are compute-bound and keep the scratch +
cuBLAS path.

int4: the plain layout of fitllm/quant/int4.py (two codes per byte, channel 2j in the low nibble; per group
of input channels a scale and a zero: w = (q - 8) * scale + zero), unpacked and dequantized in registers.
Without it a CUDA int4 layer would dequantize its whole weight on every call.

Tested on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    COMPUTE: tl.constexpr = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0
        )
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0
        )
        acc += tl.dot(x.to(COMPUTE), w.to(COMPUTE), input_precision=PRECISION, out_dtype=tl.float32)
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float) times int8 `weight` [N, K] with per-row `scale` [N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        x,
        weight,
        scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=128,
        **_compute_flags(x),
    )
    return out


@triton.jit
def _int4_matmul_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    COMPUTE: tl.constexpr = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn[None, :] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k[:, None] < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0
        )
        packed = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None] // 2, mask=k_ok & n_ok, other=0)
        q = (packed >> ((k[:, None] % 2) * 4)) & 15
        sz = sz_ptr + ((k[:, None] // GROUP) * N + rn[None, :]) * 2
        scale = tl.load(sz, mask=k_ok & n_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=k_ok & n_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * scale + zero
        acc += tl.dot(x.to(COMPUTE), w.to(COMPUTE), input_precision=PRECISION, out_dtype=tl.float32)
    mask = (rm[:, None] < M) & n_ok
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] times the plain-layout int4 weight (`packed` [N, K / 2] uint8, `scale_zeros` [K / group, N, 2])
    -> [M, N] in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    x = x.contiguous()
    scale_zeros = scale_zeros.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](
        x,
        packed,
        scale_zeros,
        out,
        m,
        n,
        k,
        x.stride(0),
        packed.stride(0),
        out.stride(0),
        GROUP=group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64,
        **_compute_flags(x),
    )
    return out


def _blocks(m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): small batches get narrow column blocks, so a 4096-wide layer spreads over the SMs."""
    return (16 if m <= 16 else 32 if m <= 32 else 64), (32 if m <= 16 else 64)


def _compute_flags(x: torch.Tensor) -> dict:
    return dict(
        # Triton's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16): float32 there.
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 models: no TF32 rounding
    )
