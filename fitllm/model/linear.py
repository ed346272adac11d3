"""Linear layers written for tensor parallelism: each weight loader takes only its rank's shard.

At world size 1 they are plain linears. q/k/v and gate/up are fused into one matrix each, so a decoder
layer runs four matmuls instead of seven (fewer kernel launches and Python calls per step).
"""

from __future__ import annotations

import torch
from torch import nn

from fitllm.distributed import get_tp_rank, get_tp_world_size, kv_head_start, local_kv_heads, tp_all_reduce
from fitllm.quant.base import QuantMethod, UnquantizedMethod
from fitllm.quant.gguf_blocks import GGUFBlocks, row_chunks


class ShapeMismatch(ValueError):
    """A checkpoint tensor whose shape is not the one the model (its config) expects."""

    def __init__(self, got: tuple[int, ...], expected: tuple[int, ...], name: str | None = None) -> None:
        which = "" if name is None else f" for {name!r}"
        super().__init__(f"checkpoint tensor{which} has shape {got}, the model expects {expected}")
        self.got, self.expected = got, expected


def expect_rows(loaded: torch.Tensor | GGUFBlocks, rows: int) -> None:
    """The checkpoint holds exactly `rows` output rows (a narrow would silently take the first ones)."""
    shape = tuple(loaded.shape)
    if not shape or shape[0] != rows:
        raise ShapeMismatch(shape, (rows, *shape[1:]))


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """y = x W^T (+ b) for this rank's [out_features, in_features] weight, stored as `quant` says (the
    model dtype by default; see fitllm/quant). The bias always stays in the model dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, quant: QuantMethod | None = None
    ) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant or UnquantizedMethod()
        self.quant.create_weights(self, out_features, in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _load_rows(self, offset: int, size: int, src: torch.Tensor | GGUFBlocks) -> None:
        """Checkpoint rows for output rows [offset, offset + size), quantized as they are stored (or, for
        prequantized GGUF blocks the method takes, stored as they are)."""
        if tuple(src.shape) != (size, self.in_features):
            raise ShapeMismatch(tuple(src.shape), (size, self.in_features))
        if not isinstance(src, GGUFBlocks):
            self.quant.load_rows(self, offset, src)
        elif src.qtype in self.quant.block_types():
            self.quant.load_blocks(self, offset, src)
        else:  # rows are independent in every method: dequantize and store a chunk at a time
            for start, rows in row_chunks(src):
                self.quant.load_rows(self, offset + start, rows)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param is self.bias:
            _copy_checked(param.data, loaded)
        else:
            self._load_rows(0, self.out_features, loaded)

    def _load_stacked(
        self, param: nn.Parameter, loaded: torch.Tensor, parts: list[tuple[object, int]]
    ) -> None:
        """A checkpoint tensor holding several shards one after another: each (shard id, full rows) part
        goes through weight_loader as if it had come alone."""
        expect_rows(loaded, sum(rows for _, rows in parts))
        offset = 0
        for shard_id, rows in parts:
            self.weight_loader(param, loaded.narrow(0, offset, rows), shard_id)
            offset += rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant.apply(self, x)
        return out if self.bias is None else out + self.bias


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeMismatch(tuple(src.shape), tuple(dst.shape))
    dst.copy_(src)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps rows [rank*n, (rank+1)*n)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, quant: QuantMethod | None = None
    ) -> None:
        super().__init__(in_features, _divide(out_features, get_tp_world_size()), bias, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = self.out_features
        expect_rows(loaded, n * self.tp_size)
        if param is self.bias:
            _copy_checked(param.data, loaded.narrow(0, self.tp_rank * n, n))
        else:
            self._load_rows(0, n, loaded.narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked into one (gate_proj + up_proj)."""

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool = False, quant: QuantMethod | None = None
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # a checkpoint that stores the matrices already stacked (GLM's gate_up_proj)
            self._load_stacked(param, loaded, list(enumerate(self.output_sizes)))
            return
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        expect_rows(loaded, size * self.tp_size)
        shard = loaded.narrow(0, self.tp_rank * size, size)
        if param is self.bias:
            _copy_checked(param.data.narrow(0, offset, size), shard)
        else:
            self._load_rows(offset, size, shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix; heads split across ranks. With fewer KV heads than ranks, each
    rank holds one KV head, shared by the ranks whose query heads use it (`kv_head_start`)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        quant: QuantMethod | None = None,
    ) -> None:
        tp = get_tp_world_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp)
        self.total_kv_heads = num_kv_heads
        self.num_kv_heads = local_kv_heads(num_kv_heads, tp)
        # Built as one column-parallel matrix of this rank's rows (replicated KV heads counted per rank).
        LinearBase.__init__(
            self, hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias, quant
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # q, k and v already stacked in the checkpoint (ChatGLM's query_key_value)
            q = self.num_heads * self.tp_size * self.head_dim
            kv = self.total_kv_heads * self.head_dim
            self._load_stacked(param, loaded, [("q", q), ("k", kv), ("v", kv)])
            return
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[str(shard_id)]
        if shard_id == "q":
            expect_rows(loaded, size * self.tp_size)
            start = self.tp_rank * size
        else:
            expect_rows(loaded, self.total_kv_heads * self.head_dim)
            start = kv_head_start(self.tp_rank, self.total_kv_heads, self.tp_size) * self.head_dim
        shard = loaded.narrow(0, start, size)
        if param is self.bias:
            _copy_checked(param.data.narrow(0, offset, size), shard)
        else:
            self._load_rows(offset, size, shard)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, quant: QuantMethod | None = None
    ) -> None:
        tp = get_tp_world_size()
        local = _divide(in_features, tp)
        group = getattr(quant, "group_size", None)
        if tp > 1 and group and local % group:
            # An int4 group straddling two ranks' columns would need both halves to dequantize.
            fits = [g for g in (128, 64, 32, 16) if local % g == 0]
            raise ValueError(
                f"--quant-group-size {group} would make int4 groups straddle the tensor-parallel shards "
                f"({in_features} input features split {tp} ways are {local} each); use "
                f"--quant-group-size {fits[0] if fits else 'N'} (a divisor of {local}) or a smaller "
                f"--tensor-parallel-size"
            )
        super().__init__(local, out_features, bias, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param is self.bias:  # added once, after the reduce
            _copy_checked(param.data, loaded)
            return
        n = self.in_features
        if tuple(loaded.shape) != (self.out_features, n * self.tp_size):
            raise ShapeMismatch(tuple(loaded.shape), (self.out_features, n * self.tp_size))
        if self.tp_size > 1 and not isinstance(loaded, GGUFBlocks):
            # Each output row's scale is the whole row's, as at world size 1 (int8: one scale per row).
            self.quant.load_column_shard(self, loaded, self.tp_rank * n, n)
            return
        self._load_rows(0, self.out_features, loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant.apply(self, x)
        if self.tp_size > 1:  # this layer's own group size (a world-size-1 model may share the process)
            tp_all_reduce(out)
        if self.bias is None:
            return out
        return out + self.bias
