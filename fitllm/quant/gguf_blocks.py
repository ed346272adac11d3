"""GGUF's 32-element quantized blocks (Q8_0, Q4_0, Q4_1), read as codes and scales without dequantizing.

A GGUF checkpoint of this kind is already quantized. Dequantizing it to float and quantizing again costs a
float copy of every tensor and, when the grids differ, a second rounding. When the `--quantization` method
can hold a block type's numbers exactly (int4 with group 32 holds Q4_0 and Q4_1; int8 holds Q8_0 up to its
per-row scale), the loader hands it the codes instead (`QuantMethod.load_blocks`); every other tensor is
dequantized, a chunk of rows at a time (`row_chunks`), so that no tensor is ever whole in float32: the load
peak stays the final weights plus one chunk.

Block layouts (ggml): Q8_0 = float16 d, 32 int8 q; w = d * q. Q4_0 = float16 d, 16 bytes; w = d * (q - 8).
Q4_1 = float16 d, float16 m, 16 bytes; w = d * q + m. In the 4-bit types byte j holds element j in its low
nibble and element j + 16 in its high nibble.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@dataclass
class GGUFBlocks:
    """One tensor [rows, cols] of a block type: codes [rows, cols] (int8 for Q8_0, uint8 in 0..15 for the
    4-bit types), scales d [rows, cols / 32] float32 and, for Q4_1, mins m of the same shape."""

    qtype: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> GGUFBlocks:
        """Rows, or whole blocks of columns, like Tensor.narrow (tensor-parallel shards)."""
        if dim == 0:
            s, n = start, length
        else:
            if start % BLOCK or length % BLOCK:
                raise ValueError(f"a {self.qtype} tensor can only be split on its {BLOCK}-column blocks")
            s, n = start // BLOCK, length // BLOCK
        return GGUFBlocks(
            self.qtype,
            self.codes.narrow(dim, start, length),
            self.scales.narrow(dim, s, n),
            None if self.mins is None else self.mins.narrow(dim, s, n),
        )

    def index_rows(self, rows: torch.Tensor) -> GGUFBlocks:
        """The same tensor with its rows reordered (llama.cpp's q/k permutation undone)."""
        return GGUFBlocks(
            self.qtype,
            self.codes.index_select(0, rows),
            self.scales.index_select(0, rows),
            None if self.mins is None else self.mins.index_select(0, rows),
        )

    def dequantize(self) -> torch.Tensor:
        """Float32 [rows, cols]."""
        n, k = self.codes.shape
        q = self.codes.float().view(n, k // BLOCK, BLOCK)
        if self.qtype == "Q4_0":
            q = q - 8.0
        w = q * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.view(n, k)


DEQUANT_ROWS = 1024  # rows dequantized at once where blocks must become floats (bounds the float32 transient)


def row_chunks(blocks: GGUFBlocks) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) over the tensor, DEQUANT_ROWS at a time."""
    for start in range(0, blocks.shape[0], DEQUANT_ROWS):
        yield start, blocks.narrow(0, start, min(DEQUANT_ROWS, blocks.shape[0] - start)).dequantize()


def read_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> GGUFBlocks:
    """Parse a GGUF tensor's raw bytes (uint8, any shape) of type `qtype` into a [rows, cols] GGUFBlocks."""
    n, k = shape
    raw = np.asarray(data, dtype=np.uint8).reshape(n * (k // BLOCK), -1)
    if qtype == "Q8_0":
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        codes = torch.from_numpy(raw[:, 2:].copy().view(np.int8)).view(n, k)
        return GGUFBlocks(qtype, codes, torch.from_numpy(d).view(n, k // BLOCK))
    head = 4 if qtype == "Q4_1" else 2
    d = torch.from_numpy(raw[:, :2].copy().view(np.float16).astype(np.float32)).view(n, k // BLOCK)
    mins = None
    if qtype == "Q4_1":
        mins = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)).view(n, k // BLOCK)
    packed = torch.from_numpy(raw[:, head:].copy())  # [blocks, 16]
    codes = torch.cat([packed & 15, packed >> 4], dim=1).view(n, k)
    return GGUFBlocks(qtype, codes, d, mins)
