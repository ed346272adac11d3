"""fitllm's CPU decode attention kernel (fitllm/kernels/decode_attention.c): a decode group's attention read straight from the
paged cache, for the reference backend's float32 / bfloat16 caches and its int8 cache (`--kv-cache-dtype int8`).

Why: at batch 1 the reference path costs two PyTorch calls a layer (gathering K/V rows, then SDPA), ~80 us
at a few hundred tokens of context, where the arithmetic is a few microseconds. The kernel reads the rows
where they lie. Built and loaded as fitllm's other CPU kernels are (fitllm/quant/cpu_kernels.py: gcc at first
use, cached; `FITLLM_CPU_KERNELS=0` or no compiler leaves the PyTorch path serving).
"""

from __future__ import annotations

import ctypes

import torch

from fitllm.quant.cpu_kernels import DTYPES, cpu_supports, kernel_once

KV_SAME, KV_INT8 = (
    0,
    1,
)  # decode_attention.c's kv_kind: the cache in q's dtype, or int8 codes + float32 scales


class DecodeAttentionKernel:
    """`fitllm_decode_attention`: out [n, kvh * group, d] = softmax(q K^T * scale) V over each request's
    first `lengths[r]` rows of `rows` ([kvh, n, ctx] row ids into the cache's [slots * kvh, d] K and V)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_decode_attention
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [
            ptr,
            i32,
            i64,
            i64,
            i64,
            i64,
            ptr,
            ptr,
            i32,
            ptr,
            i64,
            ptr,
            ctypes.c_float,
            ptr,
            i32,
            i32,
        ]
        fn.restype = i32
        self._fn = fn
        self._bf16_dot = int(cpu_supports("avx512_bf16"))

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        context: int,
        lengths: torch.Tensor,
        num_kv_heads: int,
        scale: float,
        kv_int8: bool = False,
    ) -> torch.Tensor:
        """q [n, Hq, d] contiguous; k_cache / v_cache: one slab's K and V ([slots, kvh, d] in q's dtype, or
        with `kv_int8` the int8 cache's [slots, kvh, d + 4] bytes: codes and a float32 scale; contiguous);
        rows int64 [kvh * n * context]; lengths int64 [n]. The result [n, Hq, d] in q's dtype."""
        n, hq, d = q.shape
        out = torch.empty_like(q)
        rc = self._fn(
            q.data_ptr(), DTYPES[q.dtype], n, num_kv_heads, hq // num_kv_heads, d, k_cache.data_ptr(),
            v_cache.data_ptr(), KV_INT8 if kv_int8 else KV_SAME, rows.data_ptr(), context, lengths.data_ptr(),
            scale, out.data_ptr(), self._bf16_dot, torch.get_num_threads(),
        )  # fmt: skip
        if rc == -1:
            raise MemoryError("fitllm_decode_attention: no memory for the scores")
        if rc != 0:
            raise ValueError(
                f"fitllm_decode_attention: {hq // num_kv_heads} query heads per KV head (max 64)"
            )
        return out

    @staticmethod
    def takes(
        q: torch.Tensor, k_cache: torch.Tensor, rows: torch.Tensor, num_kv_heads: int, kv_int8: bool = False
    ) -> bool:
        """Whether a call is in the form the kernel reads."""
        return (
            q.device.type == "cpu"
            and q.dtype in DTYPES
            and k_cache.dtype == (torch.uint8 if kv_int8 else q.dtype)
            and q.is_contiguous()
            and k_cache.is_contiguous()
            and rows.dtype == torch.int64
            and rows.is_contiguous()
            and q.shape[1] // num_kv_heads <= 64
        )


_kernel: list[DecodeAttentionKernel | None] = []


def decode_attention_kernel() -> DecodeAttentionKernel | None:
    """The built kernel, or None where fitllm's CPU kernels cannot run here (built on first use)."""
    return kernel_once(_kernel, DecodeAttentionKernel)
