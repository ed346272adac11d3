"""The QuantMethod interface and the unquantized (model dtype) method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.quant.cpu_kernels import GEMM_BF16, CLinear, bf16_gemm_op, bf16_kernel
from fitllm.quant.gguf_blocks import GGUFBlocks


class QuantMethod:
    """How one linear layer stores, loads and applies its [out_features, in_features] weight."""

    name = "none"
    uses_scratch = False  # multiplies large batches through a shared model-dtype copy of the weight
    derived_params: tuple[str, ...] = ()  # written by the weight loader with `weight` (scales), not loaded
    # How the LM head (and a tied embedding) is stored beside this method's decoder linears (`--lm-head-dtype`,
    # set by fitllm.quant.get_quant_method); None: the model dtype. It rides on the decoder's method so that
    # every place that builds or counts a model from one method (loader, planner) gets the same head.
    head: QuantMethod | None = None

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        raise NotImplementedError

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        """Store checkpoint rows [n, in_features] (shape already checked) at output rows [offset, offset + n)."""
        raise NotImplementedError

    def load_column_shard(self, layer: nn.Module, rows: torch.Tensor, start: int, width: int) -> None:
        """Store columns [start, start + width) of full checkpoint rows [out_features, K] (a row-parallel
        rank's shard). By default the shard is stored as if it were the whole weight: right for the model
        dtype and for int4, whose groups lie inside one shard (RowParallelLinear checks)."""
        self.load_rows(layer, 0, rows.narrow(1, start, width))

    def describe(self) -> str:
        """How logs and reports name this method."""
        return self.name

    def block_types(self) -> tuple[str, ...]:
        """GGUF block types (fitllm/quant/gguf_blocks.py) this method takes as codes, without a float copy."""
        return ()

    def load_blocks(self, layer: nn.Module, offset: int, blocks: GGUFBlocks) -> None:
        """Store prequantized rows (a type from block_types()) at output rows [offset, offset + n)."""
        raise NotImplementedError

    def finish_loading(self, layer: nn.Module) -> None:
        """Called once every row is in (repacking into a kernel's layout, for instance)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cpu_linear(self, layer: nn.Module, rows: int) -> CLinear | None:
        """The layer as fitllm's C decode loop calls it (fitllm/model/cpu_decode_layers.py), where this
        method sends bfloat16 calls of 1 to `rows` rows on CPU to one of fitllm's kernels; None where it
        does not (the loop then leaves the model to PyTorch's path)."""
        return None

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The weight as a float [out_features, in_features] tensor (tests, reference paths)."""
        raise NotImplementedError

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in the model dtype: the lookup of an embedding tied to this head."""
        raise NotImplementedError(f"{self.describe()} cannot hold an embedding")

    def scratch_elements(self, layer: nn.Module, device_type: str = "cpu") -> int:
        """Elements of the shared model-dtype scratch this layer's matmul may use on a `device_type` device
        (0: none)."""
        return layer.out_features * layer.in_features if self.uses_scratch else 0


class UnquantizedMethod(QuantMethod):
    """The weight in the model dtype; y = x W^T."""

    name = "none"

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        layer.weight.data.narrow(0, offset, rows.shape[0]).copy_(rows)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        # bf16_kernel() first: every call (prefill's too) resolves the kernel before --compile-decode traces
        if (kernel := bf16_kernel()) is not None and kernel.takes(x, w):
            # a decode-sized call of a bfloat16 model on CPU (BF16_KERNEL_ROWS): fitllm's kernel, 3x oneDNN's
            # speed at one row, its rows the same bits in any batch
            return bf16_gemm_op(x, w) if torch.compiler.is_compiling() else kernel(x, w)
        return F.linear(x, w)

    def cpu_linear(self, layer: nn.Module, rows: int) -> CLinear | None:
        w = layer.weight
        kernel = bf16_kernel()
        if kernel is None or not kernel.takes(torch.empty(rows, w.shape[1], dtype=torch.bfloat16), w):
            return None
        return CLinear(GEMM_BF16, 0, w.shape[0], w.shape[1], 0, w.data_ptr(), None, None)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.data.float()

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)
