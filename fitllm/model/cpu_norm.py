"""fitllm's CPU residual-add + RMSNorm kernel (fitllm/kernels/rms_norm.c) for decode-sized calls: one call
where PyTorch's composite rms_norm, the add and the weight's multiply make ~15 (built and loaded as fitllm's
other CPU kernels are: gcc at first use, cached; `FITLLM_CPU_KERNELS=0` or no compiler: PyTorch's ops)."""

from __future__ import annotations

import ctypes

import torch

from fitllm.quant.cpu_kernels import DTYPES, kernel_once

MAX_ROWS = 64  # rows per call up to which the kernel serves (decode steps); prefill chunks keep PyTorch's ops


class RMSNormKernel:
    """`fitllm_add_rms_norm`: (weight * norm(x + residual), x + residual), rounded as Hugging Face's Llama
    RMSNorm rounds; only the float32 sum of squares may be added in another order."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_add_rms_norm
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int, ptr, ptr]
        fn.restype = None
        self._fn = fn

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [rows, hidden] and residual (or None) contiguous, weight [hidden], all one dtype: (the normed
        rows, x + residual, or x itself without a residual)."""
        out = torch.empty_like(x)
        summed = torch.empty_like(x) if residual is not None else x
        self._fn(
            x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(), x.shape[0],
            x.shape[1], eps, DTYPES[x.dtype], out.data_ptr(), summed.data_ptr(),
        )  # fmt: skip
        return out, summed

    @staticmethod
    def takes(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        """Whether a call is in the form the kernel reads: CPU, float32 or bfloat16 throughout, 2-D and
        contiguous, at most MAX_ROWS rows."""
        return (
            x.device.type == "cpu"
            and x.dtype in DTYPES
            and weight.dtype == x.dtype
            and x.dim() == 2
            and x.shape[0] <= MAX_ROWS
            and x.is_contiguous()
            and weight.is_contiguous()
            and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous()
                                      and residual.shape == x.shape))
        )  # fmt: skip


_kernel: list[RMSNormKernel | None] = []


def rms_norm_kernel() -> RMSNormKernel | None:
    """The built kernel, or None where fitllm's CPU kernels cannot run here (built on first use)."""
    return kernel_once(_kernel, RMSNormKernel)
