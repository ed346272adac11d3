"""int4 weight-only quantization: asymmetric, one scale and zero point per group of input channels.

For each row and each group of `group_size` consecutive input channels, w ~= a * q + b with q in [0, 15];
stored as (q - 8) * scale + zero, scale = a and zero = b + 8a (the convention of PyTorch's int4 CPU kernel,
`aten._weight_int4pack_mm_for_cpu`). Plain min/max rounding (a = (max - min) / 15, b = min) wastes levels
on a group's outliers; instead, as llama.cpp's k-quants do, several candidate grids around min/max assign
the codes and, for each, a and b are refit by least squares to those codes; the grid with the smallest
squared error wins. On the default model's layers that cuts the relative weight error at group 64 by 30%
(4.6e-3 against 6.5e-3), and a group already on a 4-bit grid (a Q4_1 checkpoint at group 32) comes back
exactly. GGUF Q4_0/Q4_1 tensors at group 32 are not requantized at all (fitllm/quant/gguf_blocks.py).

Storage: `weight` uint8 [out, in / 2] (two 4-bit values per byte) and `weight_scale_zeros` [in / group,
out, 2] in the model dtype. While loading, rows are stored in fitllm's plain layout (byte j of a row holds
input channels 2j in its low nibble and 2j + 1 in its high nibble), which is row-independent, so fused
layers quantize each shard as it arrives. `finish_loading` then repacks into the CPU kernel's blocked
layout, same shape and bytes, one matrix at a time (its int32 transient is one matrix's). Where that kernel
cannot run, CUDA keeps the plain layout for a fused Triton matmul (fitllm/quant/triton_matmul.py) and
elsewhere (float32 activations) the pure-torch fallback unpacks and dequantizes. The
kernel's layout has changed across PyTorch versions: tests pin the round trip.

That kernel is a decode kernel: its time grows with the rows of a call about as one weight read per row
(the 3072 x 576 gate_up at 512 rows: 42 ms, against 1.5 ms for a bfloat16 GEMM). From `SCRATCH_ROWS` rows
on (prefill), a layer in its layout is unpacked into one shared bfloat16 scratch, transposed ([in, out], the
layout the unpacking writes fastest), and multiplied there, as int8 does (`unpack_kernel_layout`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.quant.base import QuantMethod
from fitllm.quant.cpu_kernels import GEMM_INT4, CLinear, Int4Kernel, int4_gemm_op, int4_kernel
from fitllm.quant.gguf_blocks import BLOCK, GGUFBlocks
from fitllm.quant.int8 import Scratch
from fitllm.triton_flags import triton_available

GRID_CANDIDATES = 11  # code grids tried per group: 15 + t * GRID_STEP levels over [min, max], t in -5..5
GRID_STEP = 0.4  # 11 x 0.4 keeps 98% of the gain of 21 x 0.2 (weight error) at half the load time
ROW_CHUNK = 512  # rows quantized at once: bounds the float32 temporaries to a few copies of 512 rows


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [n, k] in [0, 15], scale_zeros float32 [k / group, n, 2]); see the module docstring."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    sz = torch.empty(k // group_size, n, 2)
    for start in range(0, n, ROW_CHUNK):
        rows = w[start : start + ROW_CHUNK]
        codes, a, b = _fit_groups(rows.float().reshape(rows.shape[0], k // group_size, group_size))
        q[start : start + rows.shape[0]] = codes.reshape(rows.shape[0], k).to(torch.uint8)
        sz[:, start : start + rows.shape[0]] = torch.stack([a, b + 8.0 * a], dim=-1).transpose(0, 1)
    return q, sz


def _fit_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (codes [r, g, size] float, a [r, g], b [r, g]) per group of x [r, g, size], w ~= a * q + b.

    Each candidate costs one rounding pass and three sums; the squared error of its least-squares fit
    follows from those sums in closed form, and only the winner's codes are rounded again at the end."""
    size = x.shape[-1]
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    span = (hi - lo).clamp(min=1e-10)
    shifted = x - lo
    sum_x, sum_xx = x.sum(-1, keepdim=True), (x * x).sum(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_iscale, best_a, best_b = torch.empty_like(lo), torch.empty_like(lo), torch.empty_like(lo)
    half = GRID_CANDIDATES // 2
    for t in range(-half, half + 1):
        iscale = (15.0 + GRID_STEP * t) / span
        q = (shifted * iscale).round_().clamp_(0, 15)
        sum_q, sum_qq, sum_qx = (
            q.sum(-1, keepdim=True),
            (q * q).sum(-1, keepdim=True),
            (q * x).sum(-1, keepdim=True),
        )
        det = size * sum_qq - sum_q * sum_q
        # Least squares for a and b given the codes; a group whose codes are all equal keeps min/max.
        a = torch.where(det > 0, (size * sum_qx - sum_q * sum_x) / det.clamp(min=1e-20), span / 15.0)
        a = a.clamp_(min=1e-10)
        b = (sum_x - a * sum_q) / size
        # sum((a q + b - x)^2), expanded.
        err = a * a * sum_qq + 2 * a * b * sum_q - 2 * a * sum_qx + size * b * b - 2 * b * sum_x + sum_xx
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_a = torch.where(better, a, best_a)
        best_b = torch.where(better, b, best_b)
    q = (shifted * best_iscale).round_().clamp_(0, 15)
    return q, best_a.squeeze(-1), best_b.squeeze(-1)


def pack_plain(q: torch.Tensor) -> torch.Tensor:
    """[n, k] values in [0, 15] -> [n, k / 2] bytes, channel 2j in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_plain(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_plain."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out


def dequantize_int4(q: torch.Tensor, scale_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 [n, k] from values [n, k] and scale_zeros [k / group, n, 2]."""
    n, k = q.shape
    sz = scale_zeros.float().transpose(0, 1)  # [n, groups, 2]
    g = q.float().reshape(n, k // group_size, group_size)
    return ((g - 8.0) * sz[..., 0:1] + sz[..., 1:2]).reshape(n, k)


HAS_TRITON = triton_available()  # CUDA: fused Triton matmul (triton_matmul.py)


# Rows per call from which a layer in the CPU kernel's layout multiplies through the bfloat16 scratch rather
# than the kernel. Measured on the default model's layers (2 threads, load ~4; /work/notes/cpuspeed.md): unpack
# 0.25 ms (576 x 576) to 2.1 ms (3072 x 576); the kernel costs as much at 32-48 rows, the GEMM itself is cheap.
SCRATCH_ROWS = 48
KERNEL_BLOCK_N = (
    64  # the kernel's layout packs output rows in blocks of 64 (a tail block differs: not unpacked)
)


def int4_path(
    device: torch.device,
    kernel_layout: bool,
    dtype: torch.dtype,
    group_size: int = 64,
    rows: int = 1,
    out_features: int = KERNEL_BLOCK_N,
    vnni: bool = False,
) -> str:
    """Which matmul an int4 layer uses for a call of `rows` rows: "vnni" (fitllm's CPU kernel on the same
    layout, where `vnni` says it is built here and takes the call: 1.6x-2.1x PyTorch's at one row),
    "aten" (PyTorch's CPU int4 kernel, bfloat16 activations on a layer repacked into its layout, fewer than
    SCRATCH_ROWS rows), "scratch" (the
    same layer from SCRATCH_ROWS rows on, when its `out_features` are whole blocks of KERNEL_BLOCK_N: unpacked
    into the shared bfloat16 scratch, dense GEMM), "triton" (CUDA: the fused dequantize-matmul, every call
    size, for groups of TRITON_GROUP_SIZES: its K block is one group) or "dequantize" (the pure-torch
    fallback: unpack to the activation dtype, then a dense GEMM)."""
    if kernel_layout and dtype == torch.bfloat16:
        if rows >= SCRATCH_ROWS and out_features % KERNEL_BLOCK_N == 0:
            return "scratch"
        return "vnni" if vnni else "aten"
    if device.type == "cuda" and HAS_TRITON and group_size in TRITON_GROUP_SIZES:
        return "triton"
    return "dequantize"


# The Triton kernel walks K one group at a time and takes a tensor-core dot over half a group (a byte's two
# nibbles pair with the even and the odd channels): at least 16 deep, so groups of 32 and up.
TRITON_GROUP_SIZES = (32, 64, 128, 256)


KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts


def cpu_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def unpack_kernel_layout(
    packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, out: torch.Tensor
) -> None:
    """W^T into `out` [in, out_features] (bfloat16) from a weight in the CPU kernel's layout: exactly the
    dequantized weight rounded once to bfloat16 (each element is (q - 8) * scale + zero computed in float).

    The kernel's layout (pinned by the tests against the kernel): output rows in blocks of 64 (n a multiple of
    KERNEL_BLOCK_N here); byte j of input channel k in block b holds row 64b + j in its low nibble and row
    64b + 32 + j in its high one, i.e. packed.view(n / 64, k, 32). Writing W^T keeps every pass contiguous in the output channels, so the scales
    ([in / group, out], one per output channel) broadcast over a leading dimension, not the innermost."""
    k, n = out.shape
    b = packed.view(n // 64, k, 32)
    blocks = out.view(k, n // 64, 64)
    # q - 8 in [-8, 7] as int8 on the packed bytes (half the elements), then one converting copy each.
    blocks[:, :, :32].copy_((b & 15).view(torch.int8).sub_(8).permute(1, 0, 2))
    blocks[:, :, 32:].copy_((b >> 4).view(torch.int8).sub_(8).permute(1, 0, 2))
    grouped = out.view(k // group, group, n)
    scale = scale_zeros[..., 0].contiguous().unsqueeze(1)  # [in / group, 1, out]
    zero = scale_zeros[..., 1].contiguous().unsqueeze(1)
    torch.addcmul(zero, grouped, scale, out=grouped)


class Int4Method(QuantMethod):
    """Group-wise asymmetric 4-bit weights; PyTorch's CPU kernel when it serves (through the bfloat16 scratch
    for prefill-sized calls), else pure torch."""

    name = "int4"
    derived_params = ("weight_scale_zeros",)

    def __init__(self, group_size: int, in_features: tuple[int, ...] = ()) -> None:
        """`in_features`: the model's linear input widths, if known, so that an error can suggest group
        sizes that divide them."""
        if group_size < 2 or group_size & (group_size - 1):
            sizes = suggest_group_sizes(group_size, in_features)
            fits = " (dividing every linear's input features)" if in_features else ""
            hint = (
                f"use e.g. {' or '.join(map(str, sizes))}{fits}, or"
                if sizes
                else "no power of two divides every linear's input features; use"
            )
            raise ValueError(
                f"--quant-group-size must be a power of two >= 2; got {group_size}: {hint} --quantization int8"
            )
        self.group_size = group_size
        self.scratch = Scratch()

    def scratch_elements(self, layer: nn.Module, device_type: str = "cpu") -> int:
        """The scratch serves layers in the CPU kernel's layout only (`_use_kernel`); elsewhere (CUDA, float32
        models) int4 multiplies through Triton or the per-call fallback."""
        kernel = device_type == "cpu" and cpu_kernel_available() and self._kernel_shape(layer)
        unpacked = kernel and layer.out_features % KERNEL_BLOCK_N == 0
        return layer.out_features * layer.in_features if unpacked else 0

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.group_size:
            raise ValueError(
                f"--quantization int4: --quant-group-size {self.group_size} does not divide a layer's "
                f"{in_features} input features; use a group size that does (e.g. "
                f"{_largest_pow2_divisor(in_features, self.group_size)}) or --quantization int8"
            )

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        self.check_shape(out_features, in_features)
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False
        )
        layer.weight_scale_zeros = nn.Parameter(
            torch.empty(in_features // self.group_size, out_features, 2), requires_grad=False
        )
        layer.int4_kernel_layout = False  # rows are in the plain layout until finish_loading repacks

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        q, sz = quantize_int4(rows, self.group_size)
        n = rows.shape[0]
        layer.weight.data.narrow(0, offset, n).copy_(pack_plain(q))
        layer.weight_scale_zeros.data.narrow(1, offset, n).copy_(sz)

    def describe(self) -> str:
        return f"int4 (group {self.group_size})"

    def block_types(self) -> tuple[str, ...]:
        # GGUF's 4-bit types are groups of 32 on the same (q - 8) * scale + zero form: taken as they are.
        return ("Q4_0", "Q4_1") if self.group_size == BLOCK else ()

    def load_blocks(self, layer: nn.Module, offset: int, blocks: GGUFBlocks) -> None:
        n = blocks.shape[0]
        d = blocks.scales
        zero = torch.zeros_like(d) if blocks.mins is None else blocks.mins + 8.0 * d  # Q4_0: w = d * (q - 8)
        layer.weight.data.narrow(0, offset, n).copy_(pack_plain(blocks.codes))
        layer.weight_scale_zeros.data.narrow(1, offset, n).copy_(
            torch.stack([d, zero], dim=-1).transpose(0, 1)
        )

    def _kernel_shape(self, layer: nn.Module) -> bool:
        """Whether the CPU kernel takes this layer (on any device: the planner asks of a meta-built model)."""
        return (
            layer.weight.shape[0] % 16 == 0  # the kernel packs rows in tiles of 16
            and self.group_size in KERNEL_GROUP_SIZES
            and layer.weight_scale_zeros.dtype == torch.bfloat16
        )

    def _use_kernel(self, layer: nn.Module) -> bool:
        return layer.weight.device.type == "cpu" and cpu_kernel_available() and self._kernel_shape(layer)

    def finish_loading(self, layer: nn.Module) -> None:
        if self._use_kernel(layer) and not layer.int4_kernel_layout:
            q = unpack_plain(layer.weight.data).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            assert packed.shape == layer.weight.shape and packed.dtype == torch.uint8, (
                f"PyTorch's int4 CPU layout changed: {tuple(packed.shape)} {packed.dtype}"
            )
            layer.weight.data.copy_(packed)
            layer.int4_kernel_layout = True

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # decode's [tokens, features]: no view ops
        n = layer.weight.shape[0]
        kernel, path = self._path(layer, x2)
        if path == "vnni":
            args = (x2, layer.weight, layer.weight_scale_zeros, self.group_size)
            out = int4_gemm_op(*args) if torch.compiler.is_compiling() else kernel(*args)
        elif path == "aten":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, layer.weight, self.group_size, layer.weight_scale_zeros
            )
        elif path == "scratch":
            wt = self.scratch.get(torch.Size((x2.shape[1], n)), x2.dtype, x2.device)
            if kernel is not None:  # the same bytes in one pass (4x-7x faster)
                kernel.unpack_into(layer.weight, layer.weight_scale_zeros, self.group_size, wt)
            else:
                unpack_kernel_layout(layer.weight, layer.weight_scale_zeros, self.group_size, wt)
            out = torch.mm(x2, wt)
        elif path == "triton":
            from fitllm.quant.triton_matmul import int4_matmul

            out = int4_matmul(x2, layer.weight, layer.weight_scale_zeros, self.group_size)
        else:
            out = F.linear(x2, self.dequantize(layer).to(x2.dtype))
        return out if x2 is x else out.view(*x.shape[:-1], out.shape[-1])

    def _path(self, layer: nn.Module, x2: torch.Tensor) -> tuple[Int4Kernel | None, str]:
        """fitllm's kernel where the layer is in its layout and it is built here, and `int4_path`'s choice
        for activations x2 [rows, K]."""
        kernel = int4_kernel() if layer.int4_kernel_layout else None
        vnni = kernel is not None and kernel.takes(
            x2, layer.weight, layer.weight_scale_zeros, self.group_size
        )
        n = layer.weight.shape[0]
        return kernel, int4_path(
            x2.device, layer.int4_kernel_layout, x2.dtype, self.group_size, x2.shape[0], n, vnni
        )

    def cpu_linear(self, layer: nn.Module, rows: int) -> CLinear | None:
        w, sz = layer.weight, layer.weight_scale_zeros
        sample = torch.empty(rows, layer.in_features, dtype=torch.bfloat16, device=w.device)
        if self._path(layer, sample)[1] != "vnni":
            return None
        return CLinear(
            GEMM_INT4, 0, w.shape[0], layer.in_features, self.group_size, w.data_ptr(), sz.data_ptr()
        )

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if layer.int4_kernel_layout:
            # Unpack through the kernel itself: an identity batch gives W^T column by column.
            k = layer.weight.shape[1] * 2
            eye = torch.eye(k, dtype=torch.bfloat16, device=layer.weight.device)
            return (
                torch.ops.aten._weight_int4pack_mm_for_cpu(
                    eye, layer.weight, self.group_size, layer.weight_scale_zeros
                )
                .t()
                .float()
            )
        kernel = int4_kernel() if layer.weight.device.type == "cpu" else None
        if kernel is not None:  # one pass in C (a float32 model's layers: ~5x faster decode on CPU)
            w = kernel.dequantize_plain(layer.weight.data, layer.weight_scale_zeros.data, self.group_size)
            if w is not None:
                return w
        q = unpack_plain(layer.weight.data)
        return dequantize_int4(q, layer.weight_scale_zeros.data, self.group_size)


def suggest_group_sizes(group_size: int, in_features: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Up to two valid group sizes nearest `group_size` (by ratio), smaller first: powers of two that
    divide every width in `in_features`, preferring the CPU kernel's sizes (32-256)."""
    valid = [2**i for i in range(1, 13) if all(n % 2**i == 0 for n in in_features)]
    preferred = [g for g in valid if g in KERNEL_GROUP_SIZES]
    pool = preferred if len(preferred) >= 2 else valid
    target = max(group_size, 1).bit_length()
    return tuple(sorted(sorted(pool, key=lambda g: (abs(g.bit_length() - target), g))[:2]))


def _largest_pow2_divisor(n: int, cap: int) -> int:
    g = cap
    while g > 2 and n % g:
        g //= 2
    return g
