"""A GGUF header walked against the file's size before the `gguf` library parses it.

The library trusts the counts a header states: a numeric metadata array claiming 2^40 elements makes its
reader loop (and grow memory) for as long as that count, reading nothing past the end of the file. Here
every count and length is checked against the bytes that remain, so a lying or truncated header is one
error naming the entry, in time proportional to the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from fitllm.loader.checkpoint import CheckpointError

# GGUF value types with a fixed size: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Reader:
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

    def unpack(self, fmt: str, what: str) -> int:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        start = self.take(n, what)
        return bytes(self.buf[start : start + min(n, 200)]).decode("utf-8", "replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _FIXED:
            self.take(_FIXED[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY and depth < 3:
            itype = self.unpack("I", what)
            count = self.unpack("Q", what)
            if itype in _FIXED:
                self.take(count * _FIXED[itype], f"{what} ({count} elements)")
                return
            if itype not in (_STRING, _ARRAY) or count > (len(self.buf) - self.pos) // 8:
                raise self.fail(f"{what} claims {count} elements of type {itype}, more than the file holds")
            for _ in range(count):
                self.value(itype, what, depth + 1)
        else:
            raise self.fail(f"{what} has an unknown value type {vtype}")


def check_gguf_header(path: Path) -> None:
    """Raise CheckpointError naming the entry if the header's counts and lengths overrun the file."""
    if path.stat().st_size < 24:
        raise CheckpointError(
            f"{path} is not a usable GGUF file: {path.stat().st_size} bytes is shorter than a header"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        version = struct.unpack_from("<I", buf, 4)[0]
        r = _Reader(path, buf, "<" if version & 0xFFFF else ">")  # llama.cpp's big-endian files
        r.pos = 8
        num_tensors = r.unpack("Q", "the tensor count")
        num_fields = r.unpack("Q", "the metadata count")
        for count, what, least in ((num_fields, "metadata entries", 13), (num_tensors, "tensors", 24)):
            if count > len(buf) // least:
                raise r.fail(
                    f"the header claims {count} {what}; a file of {len(buf)} bytes holds at most {len(buf) // least}"
                )
        for _ in range(num_fields):
            key = r.string("a metadata key")
            r.value(r.unpack("I", f"metadata {key!r}"), f"metadata {key!r}")
        for _ in range(num_tensors):
            name = r.string("a tensor name")
            dims = r.unpack("I", f"tensor {name!r}")
            if dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} claims {dims} dimensions (GGUF allows at most {_MAX_DIMS})")
            r.take(8 * dims + 4 + 8, f"tensor {name!r}")
