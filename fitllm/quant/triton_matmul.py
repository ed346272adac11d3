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

import torch
import triton
import triton.language as tl

from fitllm.triton_flags import dot_flags


@triton.jit
def _weight_only_matmul_kernel(
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
    k_per_split,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out = x @ W^T for W int8 with a scale per row (BITS 8, `s_ptr` [N]) or plain-layout int4 with a scale
    and zero per group of GROUP input channels (BITS 4, `s_ptr` [K / GROUP, N, 2]). With SPLIT_K > 1, program
    (m, n, s) sums input channels [s * k_per_split, (s + 1) * k_per_split) into float32 partials
    `out_ptr` [SPLIT_K, M, N] (stride_om is N), which the caller adds up."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    COMPUTE: tl.constexpr = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm[:, None] < M
    n_ok = rn[None, :] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if BITS == 8:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=(k[:, None] < K) & n_ok, other=0)
            acc += tl.dot(x.to(COMPUTE), w.to(COMPUTE), input_precision=PRECISION, out_dtype=tl.float32)
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    else:
        # One K block is one group (BLOCK_K == GROUP): each packed byte is loaded once (a [GROUP / 2, BLOCK_N]
        # tile, bytes contiguous along K), its low nibbles pair with the even input channels and its high
        # nibbles with the odd ones, and the group's scale and zero come out of the dot:
        #   sum_k x_k ((q_k - 8) s + z) = s * sum_k x_k (q_k - 8) + z * sum_k x_k,
        # so the tile is only converted to the compute dtype, and scale and zero are one [BLOCK_N] pair per
        # group instead of a load per weight.
        HALF: tl.constexpr = BLOCK_K // 2
        rb = tl.arange(0, HALF)
        rpair = tl.arange(0, 2)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            b = k0 // 2 + rb  # packed byte columns of this group
            b_ok = b < K // 2
            packed = tl.load(w_ptr + rn[None, :] * stride_wn + b[:, None], mask=b_ok[:, None] & n_ok, other=0)
            lo = ((packed & 15).to(tl.int32) - 8).to(COMPUTE)
            hi = ((packed >> 4).to(tl.int32) - 8).to(COMPUTE)
            k = k0 + tl.arange(
                0, BLOCK_K
            )  # x's group as one contiguous tile, split into even and odd channels
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            part = tl.dot(x_even.to(COMPUTE), lo, input_precision=PRECISION, out_dtype=tl.float32)
            part += tl.dot(x_odd.to(COMPUTE), hi, input_precision=PRECISION, out_dtype=tl.float32)
            x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
            sz = tl.load(
                s_ptr + ((k0 // GROUP) * N + rn[:, None]) * 2 + rpair[None, :],
                mask=(rn[:, None] < N) & (rpair[None, :] < 2),
                other=0.0,
            ).to(tl.float32)
            scale, zero = tl.split(sz)
            acc += part * scale[None, :] + x_sum[:, None] * zero[None, :]
    mask = m_ok & n_ok
    out_ptr += pid_k * M * stride_om  # this split's partials (0 without a split)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, split_k: int | None = None
) -> torch.Tensor:
    """x [M, K] (float) times int8 `weight` [N, K] with per-row `scale` [N] -> [M, N] in x's dtype."""
    return _weight_only_matmul(x, weight, scale, bits=8, group=0, block_k=128, split_k=split_k)


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_zeros: torch.Tensor,
    group_size: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [M, K] times the plain-layout int4 weight (`packed` [N, K / 2] uint8, `scale_zeros` [K / group, N, 2])
    -> [M, N] in x's dtype."""
    # One K block per group: scale and zero are then one pair per output channel and block (see the kernel).
    return _weight_only_matmul(
        x, packed, scale_zeros, bits=4, group=group_size, block_k=group_size, split_k=split_k
    )


MAX_SPLIT_K = 8
MIN_K_BLOCKS_PER_SPLIT = 4  # each split walks at least 4 K blocks, so its loop still pipelines


def choose_split_k(tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """Split-K for a weight-only matmul whose output has `tiles` blocks: decode-sized calls of a 2048-wide
    layer give 64 programs on an H100's 132 SMs, half of it idle while it streams the weights. Double the
    splits while the programs stay under two per SM and each split keeps MIN_K_BLOCKS_PER_SPLIT blocks of
    K, at most MAX_SPLIT_K. Partials are float32 and summed in a fixed order (deterministic, unlike atomics).
    Unmeasured on a GPU so far: scripts/gpu_check.sh's micro step times it against bf16 cuBLAS."""
    splits = 1
    blocks = triton.cdiv(k, block_k)
    while (
        splits < MAX_SPLIT_K
        and tiles * splits * 2 <= 2 * num_sms
        and blocks >= 2 * splits * MIN_K_BLOCKS_PER_SPLIT
    ):
        splits *= 2
    return splits


def _num_sms(device: torch.device) -> int:
    """The device's SMs; 1 off CUDA (the interpreter: no split unless asked)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _weight_only_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    group: int,
    block_k: int,
    split_k: int | None = None,
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    # Small batches get narrow column blocks, so that even a 4096-wide layer spreads over the SMs.
    block_m, block_n = (16 if m <= 16 else 32 if m <= 32 else 64), (32 if m <= 16 else 64)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k is None:
        split_k = choose_split_k(tiles, k, block_k, _num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    if split_k > 1:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _weight_only_matmul_kernel[grid](
        x,
        weight,
        scales.contiguous(),
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        n,
        k_per_split,
        BITS=bits,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        **dot_flags(x.dtype),
    )
    return out.sum(0).to(x.dtype) if split_k > 1 else out
