"""fitllm's own CPU kernels (fitllm/kernels/*.c, sharing simd.h): built together into one shared object once per
machine with the system C compiler, cached, and called through ctypes.

Why a compiled kernel: at one activation row PyTorch's int8 weight-only kernel is bound by converting each
weight to float, several times slower than reading the weight (decode_gemm.c says how ours avoids that). The
source is plain C with intrinsics, no PyTorch headers, so a build takes about a second; it links OpenMP,
and PyTorch's libgomp (already loaded, same soname) serves it, so both share one thread pool.

Nothing here is required: without a compiler, on a CPU without AVX-512 VNNI (AVX-512 BF16 for the bfloat16
kernel), or with `FITLLM_CPU_KERNELS=0`, `int8_kernel()` (`int4_kernel()`, `bf16_kernel()`) is None and the
callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent.parent / "kernels"  # the C sources and the header they share
# -ffp-contract=off: a multiply and an add stay two roundings, as in the PyTorch code the kernels must equal
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512vnni")  # fmt: skip
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # as /proc/cpuinfo spells them
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes (decode_gemm.c: DT_F32, DT_BF16)

K = TypeVar("K")  # a kernel wrapper class (kernel_once)

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # the library, once loaded (or None: cannot run here)


def cache_dir() -> Path:
    """Where built kernels are kept: $FITLLM_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/fitllm."""
    root = os.environ.get("FITLLM_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fitllm" / "kernels"


def cpu_supports(*flags: str) -> bool:
    """Whether this CPU has every one of `flags`, as /proc/cpuinfo spells them (Linux; elsewhere False)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in have for f in flags)


def sources() -> list[Path]:
    """The C sources built together into fitllm's one kernel library (decode_layers.c calls the others)."""
    return sorted(KERNELS.glob("*.c"))


def _build(srcs: list[Path], compiler: str) -> Path:
    """The shared object built from `srcs`, unless a build of the same sources, the headers beside them, and
    the flags is cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    headers = sorted({h for s in srcs for h in s.parent.glob("*.h")})
    text = b"".join(p.read_bytes() for p in [*sorted(srcs), *headers])
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"fitllm_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, srcs), "-o", tmp], capture_output=True, text=True, check=True
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library() -> ctypes.CDLL | None:
    """fitllm's kernel library, built from `sources()` (cached per machine) and loaded once per process; None
    where fitllm's CPU kernels cannot run here (off, no AVX-512 VNNI, no compiler, a failed build)."""
    with _lock:
        if _loaded:
            return _loaded[0]
        lib = None
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if os.environ.get("FITLLM_CPU_KERNELS", "1") == "0":
            log.info("fitllm CPU kernels off (FITLLM_CPU_KERNELS=0): PyTorch's kernels serve")
        elif not cpu_supports(*CPU_FLAGS):
            log.info("no AVX-512 VNNI on this CPU: PyTorch's kernels serve")
        elif compiler is None:
            log.warning("no C compiler (gcc or $CC): PyTorch's slower kernels serve")
        else:
            try:
                lib = ctypes.CDLL(str(_build(sources(), compiler)))
            except (OSError, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", "") or str(err)
                log.warning(
                    "building fitllm's CPU kernels failed, PyTorch's kernels serve: %s", detail[-2000:]
                )
        _loaded.append(lib)
        return lib


GEMM_BF16, GEMM_INT8, GEMM_INT4 = 0, 1, 2  # decode_layers.c's kinds of linear


class CLinear(ctypes.Structure):
    """A linear layer as fitllm's C decode loop (decode_layers.c, `fitllm_linear`) calls its kernel: y = x W^T
    (+ bias) for bfloat16 x. Made by each quant method's `cpu_linear` from the same rule its `apply` follows,
    so a layer goes to the same kernel in the loop as in PyTorch's path."""

    _fields_ = [
        ("kind", ctypes.c_int),  # GEMM_*
        ("scale_dtype", ctypes.c_int),  # int8: the scale's DTYPES code
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("group", ctypes.c_int64),  # int4: input channels per (scale, zero)
        ("weight", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),  # int8: scale [n]; int4: scale_zeros
        ("bias", ctypes.c_void_p),  # bfloat16 [n] or None (set by the caller, which owns the bias)
    ]


class Int8Kernel:
    """`fitllm_int8_gemm` (decode_gemm.c): y = x W^T * scale for activations in float32 or bfloat16."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_int8_gemm
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32, i64, ptr, i32, i64, i32]
        fn.restype = i32
        self._fn = fn
        deq = lib.fitllm_int8_dequant
        deq.argtypes = [ptr, ptr, i32, i64, i64, ptr, i32, i32]
        deq.restype = i32
        self._dequant = deq

    def dequantize_into(self, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [N, K] (float32 or bfloat16, contiguous) = weight * scale[:, None], rounded once."""
        n, k = weight.shape
        self._dequant(
            weight.data_ptr(), scale.data_ptr(), DTYPES[scale.dtype], n, k, out.data_ptr(),
            DTYPES[out.dtype], torch.get_num_threads(),
        )  # fmt: skip
        return out

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous (float32 or bfloat16), weight int8 [N, K] contiguous, scale [N] (float32 or
        bfloat16); the result [M, N] in x's dtype."""
        m, k = x.shape
        n = weight.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
        if m == 0:
            return out
        rc = self._fn(
            x.data_ptr(), DTYPES[x.dtype], k, m, k, weight.data_ptr(), scale.data_ptr(),
            DTYPES[scale.dtype], n, out.data_ptr(), DTYPES[x.dtype], n, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("fitllm_int8_gemm: no memory for the quantized activations")
        return out

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
        """Whether a call's tensors are in the form the kernel reads."""
        return (
            x.device.type == "cpu"
            and x.dtype in DTYPES
            and scale.dtype in DTYPES
            and x.is_contiguous()
            and weight.is_contiguous()
            and scale.is_contiguous()
        )


class Int4Kernel:
    """`fitllm_int4_gemm` (decode_gemm.c): y = x W^T for a weight in PyTorch's CPU int4 layout (int4.py)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_int4_gemm
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [ptr, i32, i64, i64, ptr, ptr, i64, i64, ptr, i32, i32]
        fn.restype = i32
        self._fn = fn
        unpack = lib.fitllm_int4_unpack_t
        unpack.argtypes = [ptr, ptr, i64, i64, i64, ptr, i32]
        unpack.restype = i32
        self._unpack = unpack
        plain = lib.fitllm_int4_plain_dequant_f32
        plain.argtypes = [ptr, ptr, i64, i64, i64, ptr, i32]
        plain.restype = i32
        self._plain = plain

    def unpack_into(
        self, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, out: torch.Tensor
    ) -> torch.Tensor:
        """W^T into out [K, N] bfloat16 (contiguous), exactly as int4.unpack_kernel_layout writes it."""
        k, n = out.shape
        rc = self._unpack(
            packed.data_ptr(), scale_zeros.data_ptr(), group, n, k, out.data_ptr(), torch.get_num_threads()
        )
        if rc != 0:
            raise ValueError(f"fitllm_int4_unpack_t: shape not taken (N {n}, K {k}, group {group})")
        return out

    def dequantize_plain(
        self, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int
    ) -> torch.Tensor | None:
        """A plain-layout weight (int4.pack_plain's [N, K / 2] bytes, float32 scale_zeros [K / group, N, 2])
        as float32 [N, K], equal to int4.dequantize_int4's; None for a shape or dtype it does not take."""
        n, k = packed.shape[0], packed.shape[1] * 2
        if scale_zeros.dtype != torch.float32 or not (packed.is_contiguous() and scale_zeros.is_contiguous()):
            return None
        out = torch.empty(n, k, dtype=torch.float32)
        rc = self._plain(
            packed.data_ptr(), scale_zeros.data_ptr(), group, n, k, out.data_ptr(), torch.get_num_threads()
        )
        return out if rc == 0 else None

    def __call__(
        self, x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int
    ) -> torch.Tensor:
        """x [M, K] contiguous (float32 or bfloat16), packed uint8 [N, K / 2] in the kernel layout,
        scale_zeros bfloat16 [K / group, N, 2]; the result [M, N] in x's dtype."""
        m, k = x.shape
        n = packed.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
        if m == 0:
            return out
        rc = self._fn(
            x.data_ptr(), DTYPES[x.dtype], m, k, packed.data_ptr(), scale_zeros.data_ptr(), group, n,
            out.data_ptr(), DTYPES[x.dtype], torch.get_num_threads(),
        )  # fmt: skip
        if rc == -1:
            raise MemoryError("fitllm_int4_gemm: no memory for the quantized activations")
        if rc != 0:
            raise ValueError(f"fitllm_int4_gemm: shape not taken (N {n}, K {k}, group {group})")
        return out

    @staticmethod
    def takes(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> bool:
        """Whether a call is in the form the kernel reads: output rows in whole blocks of 64 (a tail block is
        laid out otherwise), groups of 4 channels or more, bfloat16 scales and zeros."""
        return (
            x.device.type == "cpu"
            and x.dtype in DTYPES
            and scale_zeros.dtype == torch.bfloat16
            and packed.shape[0] % 64 == 0
            and group % 4 == 0
            and x.shape[1] % group == 0
            and x.is_contiguous()
            and packed.is_contiguous()
            and scale_zeros.is_contiguous()
        )


class Bf16Kernel:
    """`fitllm_bf16_gemm` (decode_gemm.c): y = x W^T with x, W and y bfloat16, for decode-sized calls, where
    oneDNN's bfloat16 matmul reads the weight at about a third of the speed at one row (`takes` is the
    rule). Each row's result is the same bits whatever the number of rows in its call."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_bf16_gemm
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, i64, i32]
        fn.restype = i32
        self._fn = fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, K] and weight [N, K], both bfloat16 and contiguous; the result [M, N] bfloat16."""
        m, k = x.shape
        n = weight.shape[0]
        out = torch.empty(m, n, dtype=torch.bfloat16)
        if m:
            self._fn(x.data_ptr(), k, m, k, weight.data_ptr(), n, out.data_ptr(), n, torch.get_num_threads())
        return out

    @staticmethod
    def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a bfloat16 matmul call goes to the kernel: CPU, both bfloat16 and contiguous, and at most
        BF16_KERNEL_ROWS activation rows."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16
            and x.dim() == 2
            and x.shape[0] <= BF16_KERNEL_ROWS
            and x.is_contiguous()
            and weight.is_contiguous()
        )


# Rows per call up to which the bfloat16 kernel serves: decode batches, speculation checks and the few tokens a
# rewind recomputes. One rule for all of them keeps a row's numbers independent of the call it is in: a
# token decoded alone and the same token recomputed among 15 others get the same logits, as they did with
# oneDNN alone (whose rows are batch-invariant too, but not the same bits as the kernel's). The price: at 16
# rows the kernel takes 1.9x oneDNN's time (AMX there), at 8 the same, at 1-4 rows 0.3-0.6x (`fitllm bench
# int8-linear`, docs/benchmarks.md); at 8 a banned-string rewind recomputing 9-16 tokens changed the output.
BF16_KERNEL_ROWS = 16


def kernel_once(slot: list[K | None], make: Callable[[ctypes.CDLL], K], *cpu_flags: str) -> K | None:
    """The kernel `make` wraps around fitllm's library, made at first use and kept in `slot` (its module's
    one-element cache, which tests reset); None where the library cannot run here or the CPU lacks one of
    `cpu_flags`."""
    if not slot:
        lib = load_library()
        slot.append(make(lib) if lib is not None and cpu_supports(*cpu_flags) else None)
    return slot[0]


_kernel: list[Int8Kernel | None] = []
_kernel4: list[Int4Kernel | None] = []
_kernel16: list[Bf16Kernel | None] = []


def int8_kernel() -> Int8Kernel | None:
    """The built int8 VNNI kernel, or None where it cannot run here (built on first use)."""
    return kernel_once(_kernel, Int8Kernel)


def int4_kernel() -> Int4Kernel | None:
    """The built int4 VNNI kernel, or None where it cannot run here (it also needs AVX-512 VBMI)."""
    return kernel_once(_kernel4, Int4Kernel, "avx512vbmi")


def bf16_kernel() -> Bf16Kernel | None:
    """The built bfloat16 kernel, or None where it cannot run here (it needs AVX-512 BF16 too)."""
    return kernel_once(_kernel16, Bf16Kernel, "avx512_bf16")


@torch.library.custom_op("fitllm::int4_gemm", mutates_args=())
def int4_gemm_op(
    x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int
) -> torch.Tensor:
    """The int4 kernel as an operator for torch.compile (see int8_gemm_op)."""
    kernel = int4_kernel()
    assert kernel is not None, "fitllm::int4_gemm called where the kernel is not built"
    return kernel(x, packed, scale_zeros, group)


@int4_gemm_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("fitllm::int8_gemm", mutates_args=())
def int8_gemm_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel as an operator torch.compile can place in a graph (a ctypes call would break it); eager
    code calls `int8_kernel()` directly, which skips the operator's dispatch."""
    kernel = int8_kernel()
    assert kernel is not None, "fitllm::int8_gemm called where the kernel is not built"
    return kernel(x, weight, scale)


@int8_gemm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fitllm::bf16_gemm", mutates_args=())
def bf16_gemm_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The bfloat16 kernel as an operator for torch.compile (see int8_gemm_op)."""
    kernel = bf16_kernel()
    assert kernel is not None, "fitllm::bf16_gemm called where the kernel is not built"
    return kernel(x, weight)


@bf16_gemm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
