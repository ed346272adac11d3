"""int8 weight-only quantization: symmetric, one scale per output channel.

w ~= q * s with q = round(w / s) in [-127, 127], s = max|w_row| / 127. Rows are independent, so a fused
layer quantizes each checkpoint shard as it arrives. Matmul on CPU, for small batches (decode): fitllm's
AVX-512 VNNI kernel (fitllm/kernels/decode_gemm.c: activations quantized per row into two int8 parts,
int8 dot products; 1.2x-2.1x faster than PyTorch's kernel at 1-32 rows, the same numbers to bfloat16's
rounding) for bfloat16 activations where it is built, else PyTorch's own int8 weight-only kernel (`aten._weight_int8pack_mm`, measured
1.6x to 3.3x faster than bfloat16 at 1 row on this machine); from `kernel_rows()` rows on, both cost about
one extra weight read per row, so the weight is converted into a shared bfloat16 scratch and multiplied there
(measured +3.5% over bfloat16 at 512 rows of a 4096 x 4096 layer, against 2.9x for the kernel).
On CUDA, calls of up to `TRITON_ROWS` rows use a fused Triton dequantize-matmul (fitllm.quant.triton_matmul.py)
that reads each int8 weight once; larger ones use the scratch and cuBLAS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.quant.base import QuantMethod
from fitllm.quant.cpu_kernels import DTYPES, GEMM_INT8, CLinear, Int8Kernel, int8_gemm_op, int8_kernel
from fitllm.quant.gguf_blocks import BLOCK, GGUFBlocks
from fitllm.triton_flags import triton_available

HAS_TRITON = triton_available()
TRITON_ROWS = 64  # CUDA: rows per call up to which the fused Triton kernel is used (decode-sized calls)

# Rows below which PyTorch's int8 kernel beats converting the weight into the scratch and multiplying
# there, measured on this machine: 16 for a 4096 x 4096 layer; between 32 and 48 for the default model's
# layers (576 x 576 to 3072 x 576), where converting costs more relative to the matmul (at 16 rows: kernel
# 1.28x, convert-and-multiply 2.75x the bfloat16 time; at 48: 1.96x and 1.29x). fitllm's VNNI kernel takes
# the same cut: it beats PyTorch's at every row count (1.2x-2.1x, one thread, CPU time) and meets the
# scratch between 16 and 24 rows (576 x 576 at 16 rows: 110 vs 124 µs; 3072 x 576: 559 vs 626; at 32 rows
# the scratch wins: 130 vs 206, 708 vs 1094; /work/notes/int8dec.md).
KERNEL_ROWS_LARGE = 16
KERNEL_ROWS_SMALL = 32
SMALL_LAYER = 1 << 22  # weights of at most this many elements use KERNEL_ROWS_SMALL


def kernel_rows(weight_numel: int) -> int:
    """Rows per call below which a layer of `weight_numel` weights multiplies through the int8 kernel."""
    return KERNEL_ROWS_SMALL if weight_numel <= SMALL_LAYER else KERNEL_ROWS_LARGE


def int8_path(
    device: torch.device, rows: int, weight_numel: int, same_dtype: bool, vnni: bool = False
) -> str:
    """Which matmul an int8 layer uses for a call of `rows` rows: "vnni" (fitllm's CPU kernel, small calls,
    where `vnni` says it is built here and takes the call's dtypes), "aten" (PyTorch's CPU int8 kernel, small
    calls in the scale's dtype, where ours is not), "triton" (CUDA, decode-sized calls: the fused
    dequantize-matmul) or "scratch" (dequantize into a shared model-dtype copy and run the dense GEMM:
    prefill-sized calls)."""
    if device.type == "cpu" and rows < kernel_rows(weight_numel) and vnni:
        return "vnni"
    if device.type == "cpu" and rows < kernel_rows(weight_numel) and same_dtype:
        return "aten"
    if device.type == "cuda" and HAS_TRITON and rows <= TRITON_ROWS:
        return "triton"
    return "scratch"


ROW_CHUNK = 1024  # rows of a prequantized tensor rescaled at once (bounds the float temporary)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q int8 [n, k], scale float32 [n])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Scratch:
    """One model-dtype buffer shared by every layer of a method (they run one at a time), grown to the largest:
    int8's converted weight, int4's unpacked one (fitllm/quant/int4.py). One per device: with a layer split
    each device's layers share their own (each stage's planned workspace counts it)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # the one last used
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        b = self._by_device.get(device)
        if b is None or b.numel() < n or b.dtype != dtype:
            b = self._by_device[device] = torch.empty(n, dtype=dtype, device=device)
        self.buffer = b
        return b[:n].view(shape)


SCRATCH_CHUNK_ELEMENTS = 1 << 22  # a head's scratch path converts this many weights at a time (8 MiB bf16)


class Int8Method(QuantMethod):
    """`weight` int8 [out, in] plus `weight_scale` [out] in the model dtype."""

    name = "int8"
    uses_scratch = True
    derived_params = ("weight_scale",)

    def __init__(self, chunked: bool = False, scratch: Scratch | None = None) -> None:
        """`chunked`: large calls convert the weight into the scratch a slice of output rows at a time
        (`SCRATCH_CHUNK_ELEMENTS`), as the LM head does: its [vocab, hidden] weight whole in the model dtype
        would hold again the bytes the quantization saved. `scratch`: one to share (the decoder's)."""
        self.chunked = chunked
        self.scratch = scratch or Scratch()

    def _chunk_rows(self, layer: nn.Module) -> int:
        rows = layer.weight.shape[0]
        return min(rows, max(1, SCRATCH_CHUNK_ELEMENTS // layer.weight.shape[1])) if self.chunked else rows

    def scratch_elements(self, layer: nn.Module, device_type: str = "cpu") -> int:
        return self._chunk_rows(layer) * layer.in_features  # large calls, on every device

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        q, scale = quantize_int8(rows)
        n = rows.shape[0]
        layer.weight.data.narrow(0, offset, n).copy_(q)
        layer.weight_scale.data.narrow(0, offset, n).copy_(scale)

    def load_column_shard(self, layer: nn.Module, rows: torch.Tensor, start: int, width: int) -> None:
        """A row-parallel shard keeps the whole row's scale (its largest |w| over every rank's columns), so
        the ranks' partial products add up to world size 1's product."""
        for first in range(0, rows.shape[0], ROW_CHUNK):
            part = rows[first : first + ROW_CHUNK]
            q, scale = quantize_int8(part)
            layer.weight.data.narrow(0, first, part.shape[0]).copy_(q.narrow(1, start, width))
            layer.weight_scale.data.narrow(0, first, part.shape[0]).copy_(scale)

    def block_types(self) -> tuple[str, ...]:
        return ("Q8_0",)

    def load_blocks(self, layer: nn.Module, offset: int, blocks: GGUFBlocks) -> None:
        """Q8_0 codes rescaled block by block onto one scale per row: the row's largest |w| / 127, as
        quantizing the dequantized row would give, without the float copy of the tensor. Exact when a row's
        blocks share a scale; otherwise a block whose scale is smaller than the row's loses the bits between."""
        n, k = blocks.shape
        amax = blocks.scales * blocks.codes.view(n, -1, BLOCK).abs().amax(dim=-1).float()  # [n, blocks]
        scale = (amax.amax(dim=1) / 127.0).clamp(min=1e-10)
        for start in range(0, n, ROW_CHUNK):
            end = min(start + ROW_CHUNK, n)
            ratio = (blocks.scales[start:end] / scale[start:end, None]).unsqueeze(-1)
            codes = blocks.codes[start:end].view(end - start, -1, BLOCK).float().mul_(ratio)
            q = codes.round_().clamp_(-127, 127).to(torch.int8).view(end - start, k)
            layer.weight.data.narrow(0, offset + start, end - start).copy_(q)
        layer.weight_scale.data.narrow(0, offset, n).copy_(scale)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w, scale = layer.weight, layer.weight_scale
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # decode's [tokens, features]: no view ops
        kernel, path = self._path(layer, x2)
        if path == "vnni":
            out = int8_gemm_op(x2, w, scale) if torch.compiler.is_compiling() else kernel(x2, w, scale)
        elif path == "aten":
            out = torch.ops.aten._weight_int8pack_mm(x2, w, scale)
        elif path == "triton":
            from fitllm.quant.triton_matmul import int8_matmul

            out = int8_matmul(x2, w, scale)
        else:
            out = self._scratch_matmul(layer, x2)
        return out if x2 is x else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _path(layer: nn.Module, x2: torch.Tensor) -> tuple[Int8Kernel | None, str]:
        """fitllm's kernel where built here, and `int8_path`'s choice for activations x2 [rows, K]."""
        w, scale = layer.weight, layer.weight_scale
        kernel = int8_kernel() if x2.device.type == "cpu" else None
        # bfloat16 activations only: a float32 model keeps PyTorch's kernel, exact to float32 (the split
        # activations are ~16 bits; float32 is chosen for exactness, and its parity tests rely on it)
        vnni = kernel is not None and x2.dtype == torch.bfloat16 and kernel.takes(x2, w, scale)
        return kernel, int8_path(x2.device, x2.shape[0], w.numel(), x2.dtype == scale.dtype, vnni)

    def cpu_linear(self, layer: nn.Module, rows: int) -> CLinear | None:
        w, scale = layer.weight, layer.weight_scale
        sample = torch.empty(rows, w.shape[1], dtype=torch.bfloat16, device=w.device)
        if self._path(layer, sample)[1] != "vnni":
            return None
        return CLinear(
            GEMM_INT8, DTYPES[scale.dtype], w.shape[0], w.shape[1], 0, w.data_ptr(), scale.data_ptr()
        )

    def _scratch_matmul(self, layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        """x2 W^T through the model-dtype scratch, `_chunk_rows` output rows at a time. Where fitllm's CPU
        kernel is built the scratch holds the dequantized weight (one pass: 0.68x-0.94x the time of PyTorch's
        int8 copy plus scaling the product, at 16-2048 rows), else the codes, and the product is scaled."""
        w, scale = layer.weight, layer.weight_scale
        kernel = int8_kernel() if x2.device.type == "cpu" else None
        fold = kernel is not None and kernel.takes(x2, w, scale)
        step = self._chunk_rows(layer)
        out = (
            None
            if step == w.shape[0]
            else torch.empty(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device)
        )
        for start in range(0, w.shape[0], step):
            part, part_scale = w[start : start + step], scale[start : start + step]
            wd = self.scratch.get(part.shape, x2.dtype, x2.device)
            if fold:
                y = F.linear(x2, kernel.dequantize_into(part, part_scale, wd))
            else:
                y = F.linear(x2, wd.copy_(part)).mul_(part_scale.to(x2.dtype))
            if out is None:
                return y
            out[:, start : start + part.shape[0]] = y
        return out

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.data.float() * layer.weight_scale.data.float()[:, None]

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The rows the head multiplies by, rounded once to the model dtype (the scale's)."""
        scale = layer.weight_scale
        rows = F.embedding(ids, layer.weight).float()
        return rows.mul_(F.embedding(ids, scale.unsqueeze(1)).float()).to(scale.dtype)
