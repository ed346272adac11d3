"""fitllm's own CPU kernels (fitllm/quant/kernels/*.c): built once per machine with the system C compiler,
cached, and called through ctypes.

Why a compiled kernel: at one activation row PyTorch's int8 weight-only kernel is bound by converting each
weight to float, several times slower than reading the weight (int8_vnni.c says how ours avoids that). The
source is plain C with intrinsics, no PyTorch headers, so a build takes about a second; it links OpenMP,
and PyTorch's libgomp (already loaded, same soname) serves it, so both share one thread pool.

Nothing here is required: without a compiler, on a CPU without AVX-512 VNNI, or with
`FITLLM_CPU_KERNELS=0`, `int8_kernel()` is None and the callers keep PyTorch's kernels.
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "int8_vnni.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # as /proc/cpuinfo spells them
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes (int8_vnni.c: DT_F32, DT_BF16)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where built kernels are kept: $FITLLM_CACHE_DIR/kernels, else $XDG_CACHE_HOME (or ~/.cache)/fitllm."""
    root = os.environ.get("FITLLM_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fitllm" / "kernels"


def cpu_supports_vnni() -> bool:
    """Whether this CPU has the AVX-512 VNNI the kernel is built for (Linux: /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return all(f in flags for f in CPU_FLAGS)


def _build(source: Path, compiler: str) -> Path:
    """The shared object for `source`, built unless a build of the same source and flags is cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(name: str, source: Path) -> ctypes.CDLL | None:
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if os.environ.get("FITLLM_CPU_KERNELS", "1") == "0":
            log.info("fitllm CPU kernels off (FITLLM_CPU_KERNELS=0): PyTorch's kernels serve")
        elif not cpu_supports_vnni():
            log.info("no AVX-512 VNNI on this CPU: PyTorch's int8 kernel serves")
        elif compiler is None:
            log.warning("no C compiler (gcc or $CC): int8 decode uses PyTorch's slower kernel")
        else:
            try:
                lib = ctypes.CDLL(str(_build(source, compiler)))
            except (OSError, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", "") or str(err)
                log.warning("building %s failed, PyTorch's kernel serves: %s", source.name, detail[-2000:])
        _loaded[name] = lib
        return lib


class Int8Kernel:
    """`fitllm_int8_gemm` (int8_vnni.c): y = x W^T * scale for activations in float32 or bfloat16."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.fitllm_int8_gemm
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32, i64, ptr, i32, i64, i32]
        fn.restype = i32
        self._fn = fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [M, K] contiguous (float32 or bfloat16), weight int8 [N, K] contiguous, scale [N] (float32 or
        bfloat16); the result [M, N] in x's dtype."""
        m, k = x.shape
        n = weight.shape[0]
        out = torch.empty(m, n, dtype=x.dtype)
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


_kernel: list[Int8Kernel | None] = []


def int8_kernel() -> Int8Kernel | None:
    """The built int8 VNNI kernel, or None where it cannot run here (built on first use)."""
    if not _kernel:
        lib = _load("int8_vnni", SOURCE)
        _kernel.append(Int8Kernel(lib) if lib is not None else None)
    return _kernel[0]


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
