"""A GGUF file's metadata and tensor index, walked against the file's size, kept as plain Python values.

Why not the `gguf` library's reader:
- it trusts the counts a header states: a numeric metadata array claiming 2^40 elements makes it loop (and
  grow memory) for as long as that count, reading nothing past the end of the file. Here every count and
  length is checked against the bytes that remain, so a lying or truncated header is one error naming the
  entry, in time proportional to the file;
- it keeps every metadata value as numpy views of a memory map, two per string: the default model's
  vocabulary and merges are ~245,000 arrays, measured at 167 MiB of RSS for as long as the reader lives (the
  whole load). Here they are ~6 MiB of Python strings;
- its tensors are views of a memory map of the whole file, whose pages stay in the process's RSS (and its
  peak, VmHWM) once read: 94 MiB for the default model during the load. Here `read` copies one tensor's
  bytes with `pread` into memory the caller owns, so the file's pages stay in the page cache, never in RSS.
Tensor types and sizes still come from the library (`gguf.constants`), as does dequantizing.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fitllm.loader.checkpoint import CheckpointError

# GGUF value types with a fixed size: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64 (struct formats).
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# ggml types whose elements are plain numbers (the library's reader gives these typed arrays; the rest are
# blocks, given as bytes).
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}  # fmt: skip


@dataclass(slots=True)
class GGUFTensor:
    """One tensor's entry in the index: where its bytes are, not the bytes."""

    name: str
    shape: tuple[int, ...]  # GGUF order (innermost first), as the file and the library state it
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute, in the file
    n_bytes: int


class _Walker:
    def __init__(self, path: Path, buf: mmap.mmap, order: str) -> None:
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a usable GGUF file: {problem}")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos} but the file ends at {len(self.buf)} "
                f"(truncated, or a size that lies)"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        start = self.take(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _FIXED:
            return self.unpack(_FIXED[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth < 3:
            itype = self.unpack("I", what)
            count = self.unpack("Q", what)
            if itype in _FIXED:
                fmt = _FIXED[itype]
                start = self.take(count * struct.calcsize(fmt), f"{what} ({count} elements)")
                dtype = np.dtype(fmt).newbyteorder(self.order)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            if itype not in (_STRING, _ARRAY) or count > (len(self.buf) - self.pos) // 8:
                raise self.fail(f"{what} claims {count} elements of type {itype}, more than the file holds")
            return [self.value(itype, what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what} has an unknown value type {vtype}")


class GGUFFile:
    """An open GGUF file: `fields` (metadata key -> value: int, float, bool, str or a list of them),
    `tensors` (the index, in file order), and `read(tensor)` for one tensor's data. Reading holds a file
    descriptor, never a mapping; `close` it when the weights are in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields, self.tensors, self.big_endian = _walk(path)
        self._file = None  # opened at the first read (`fitllm plan` reads none), closed by close()
        self._closed = False

    def read(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's data, copied from the file into a new array shaped as the `gguf` library's reader
        shapes it (numbers: the tensor's shape, outermost first; block types: bytes per row)."""
        if self._closed:
            raise ValueError(f"{self.path}: the GGUF file was closed after loading")
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (lives until close())
        out = np.empty(tensor.n_bytes, dtype=np.uint8)
        got = os.preadv(self._file.fileno(), [memoryview(out)], tensor.offset)
        if got != tensor.n_bytes:
            raise CheckpointError(
                f"{self.path} is not a usable GGUF file: tensor {tensor.name!r} ends past the end of the file"
            )
        dims = tuple(reversed(tensor.shape))
        plain = _PLAIN.get(tensor.tensor_type.name)
        if plain is None:
            from gguf.constants import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[tensor.tensor_type]
            return out.reshape(*dims[:-1], dims[-1] // block * size)
        array = out.view(np.dtype(plain).newbyteorder(">" if self.big_endian else "<")).reshape(dims)
        return array.astype(plain) if self.big_endian else array

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


def _walk(path: Path) -> tuple[dict[str, Any], list[GGUFTensor], bool]:
    """Every metadata entry and tensor entry, each count and length checked against the file's size (the
    file is mapped only while walking its header; the tensor data's pages are never touched)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path} is not a usable GGUF file: {size} bytes is shorter than a header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        version = struct.unpack_from("<I", buf, 4)[0]
        big_endian = not version & 0xFFFF  # llama.cpp's big-endian files
        r = _Walker(path, buf, ">" if big_endian else "<")
        r.pos = 4
        version = r.unpack("I", "the version")
        if version not in _VERSIONS:
            raise r.fail(f"GGUF version {version} (fitllm reads versions {', '.join(map(str, _VERSIONS))})")
        num_tensors = r.unpack("Q", "the tensor count")
        num_fields = r.unpack("Q", "the metadata count")
        for count, what, least in ((num_fields, "metadata entries", 13), (num_tensors, "tensors", 24)):
            if count > size // least:
                raise r.fail(
                    f"the header claims {count} {what}; a file of {size} bytes holds at most {size // least}"
                )
        fields: dict[str, Any] = {}
        for _ in range(num_fields):
            key = r.string("a metadata key")
            fields[key] = r.value(r.unpack("I", f"metadata {key!r}"), f"metadata {key!r}")
        entries = []
        for _ in range(num_tensors):
            name = r.string("a tensor name")
            dims = r.unpack("I", f"tensor {name!r}")
            if dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} claims {dims} dimensions (GGUF allows at most {_MAX_DIMS})")
            shape = tuple(r.unpack("Q", f"tensor {name!r}") for _ in range(dims))
            entries.append(
                (name, shape, r.unpack("I", f"tensor {name!r}"), r.unpack("Q", f"tensor {name!r}"))
            )
        header_end = r.pos
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path} is not a usable GGUF file: general.alignment {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
    tensors, names = [], set()
    for name, shape, raw_type, offset in entries:
        what = f"{path} is not a usable GGUF file: tensor {name!r}"
        if name in names:
            raise CheckpointError(f"{what} appears twice")
        names.add(name)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{what} has an unknown type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if shape and shape[0] % block:
            raise CheckpointError(
                f"{what}: its rows of {shape[0]} are not whole {qtype.name} blocks of {block}"
            )
        n_bytes = math.prod(shape) * type_size // block
        start = data_start + offset
        if start + n_bytes > size:
            raise CheckpointError(
                f"{what} needs bytes {start}..{start + n_bytes} but the file ends at {size} (truncated)"
            )
        tensors.append(GGUFTensor(name, shape, qtype, start, n_bytes))
    return fields, tensors, big_endian
