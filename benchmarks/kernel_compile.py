"""Every Triton kernel of fitllm compiled for a Hopper GPU (sm_90) on a machine without one, and its PTX read.

    python -m benchmarks.kernel_compile [--matrix ci|full] [--cap 90] [--json PATH]

Triton's own compiler runs with a stand-in driver that reports an sm_90 target; every launch is turned into a
compile-only warmup, so the kernels are reached through fitllm's own wrappers (`paged_attention`, `write_kv`,
`int8_matmul`, `int4_matmul`) with small CPU tensors of the shapes and constexprs the engine uses, and
nothing runs. For each compiled kernel: registers, spills and stack frame (`ptxas -v`, the ptxas shipped
with Triton), shared memory, and the width of every global load, counted separately inside loops (PTX
regions closed by a backward branch: the kernels' hot loops).

Checks (a failure exits 1): every case compiles; no kernel spills registers; the attention kernel's loops
hold no global load narrower than 4 bytes (a K/V row read one element at a time), and where a row offset is
16-byte aligned (`PagedKVLayout.align`) the K/V tiles come in 16-byte loads (`cp.async` or `ld.global.v4`).
What is only reported: the weight-only matmuls' load widths (the int4 kernel reads each packed byte once, in
8-byte loads, and one scale/zero pair per group; before, 1-byte weight loads and 2-byte scale loads per
element: issue 23, item 4).

Runs as a process of its own (`main` drops TRITON_INTERPRET before triton is imported; the stand-in driver is
process-wide). `tests/test_kernel_compile.py` runs the `ci`
matrix; `full` crosses every axis.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# triton (and fitllm's kernels) are imported only by the functions that compile: importing this module for
# its PTX reading must not change the importer's Triton mode.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- the stand-in driver: Triton compiles for `cap`, launches become compile-only warmups ------------------


def install_fake_driver(cap: int) -> list[tuple[str, object, dict]]:
    """Make Triton compile for compute capability `cap` with no GPU and launch nothing; returns the list each
    compiled kernel is appended to as (kernel name, compiled kernel, launch kwargs)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import jit
    from triton.runtime.driver import driver

    class FakeDriver:
        def __init__(self) -> None:
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.set_current_device = lambda device: None

        def is_active(self) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return CudaDriver.map_python_to_cpp_type(self, ty)

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", cap, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs here")

        def get_device_interface(self):
            return torch.cuda

    driver.set_active(FakeDriver())
    compiled: list[tuple[str, object, dict]] = []
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, kwargs))
        return kernel

    jit.JITFunction.run = run
    return compiled


# ---- the cases: fitllm's wrappers at the shapes the engine uses ---------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    """One `paged_attention` call (plus the `write_kv` of its rows): decode (query_len 1) or prefill."""

    dtype: str = "bf16"
    head_dim: int = 128
    heads: tuple[int, int] = (32, 8)  # query heads, KV heads
    block_size: int = 16
    kv: str = "auto"  # auto, int8, fp8, fp8-bits (fp8 decoded from its bits: GPUs before sm_89)
    query_len: int = 1
    splits: int = 1
    num_seqs: int = 1

    @property
    def label(self) -> str:
        mode = f"decode s{self.splits}" if self.query_len == 1 else f"prefill q{self.query_len}"
        h, kvh = self.heads
        return f"attn {self.dtype} d{self.head_dim} {h}/{kvh} bs{self.block_size} kv={self.kv} {mode}"

    def launch(self) -> None:
        from fitllm.memory.kv.format import KVCacheFormat
        from fitllm.memory.kv.layout import PagedKVLayout
        from fitllm.model.attention import triton_kernels as ta

        dtype = DTYPES[self.dtype]
        h, kvh = self.heads
        fmt = KVCacheFormat("fp8" if self.kv == "fp8-bits" else self.kv, dtype, self.head_dim)
        slab_slots = 64 * self.block_size  # a 64-block slab; only the values' divisibility matters
        layout = PagedKVLayout(
            torch.empty(1, dtype=fmt.storage_dtype),
            torch.zeros(8, dtype=torch.int64),
            slab_slots,
            kvh,
            fmt.entry_width,
        )
        tokens = self.num_seqs * self.query_len
        q = torch.empty(tokens, h, self.head_dim, dtype=dtype)
        rows = torch.empty(tokens, kvh, fmt.entry_width, dtype=fmt.storage_dtype)
        ta.write_kv(rows, rows, torch.zeros(tokens, dtype=torch.int64), layout, 1)
        ta.paged_attention(
            q,
            layout,
            1,
            kv_cache_dtype=self.kv,
            block_tables=torch.zeros(self.num_seqs, 256, dtype=torch.int32),
            seq_lens=torch.ones(self.num_seqs, dtype=torch.int32),
            query_start=torch.arange(0, tokens + 1, self.query_len, dtype=torch.int32),
            max_query_len=self.query_len,
            block_size=self.block_size,
            scale=self.head_dim**-0.5,
            num_splits=self.splits,
        )


@dataclass(frozen=True)
class MatmulCase:
    """One weight-only matmul call: int8 (per-row scale) or int4 (plain layout, a scale and zero per group)."""

    bits: int = 8
    m: int = 1
    n: int = 2048
    k: int = 2048
    group: int = 0
    dtype: str = "bf16"
    split_k: int | None = None  # None: the wrapper's rule (no split for a CPU tensor)

    @property
    def label(self) -> str:
        g = f" g{self.group}" if self.bits == 4 else ""
        split = f" split{self.split_k}" if self.split_k else ""
        return f"int{self.bits}{g} {self.dtype} m{self.m} {self.n}x{self.k}{split}"

    def launch(self) -> None:
        from fitllm.quant import triton_matmul as tm

        dtype = DTYPES[self.dtype]
        x = torch.empty(self.m, self.k, dtype=dtype)
        if self.bits == 8:
            w = torch.empty(self.n, self.k, dtype=torch.int8)
            tm.int8_matmul(x, w, torch.empty(self.n, dtype=dtype), split_k=self.split_k)
        else:
            packed = torch.empty(self.n, self.k // 2, dtype=torch.uint8)
            sz = torch.empty(self.k // self.group, self.n, 2, dtype=dtype)
            tm.int4_matmul(x, packed, sz, self.group, split_k=self.split_k)


@dataclass(frozen=True)
class FusedCase:
    """The fused elementwise kernels of fitllm/model/triton_fused.py at a model's hidden / MLP width."""

    hidden: int = 4096
    inter: int = 14336
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        return f"fused add+rmsnorm {self.hidden}, silu*mul {self.inter} {self.dtype}"

    def launch(self) -> None:
        from fitllm.model import triton_fused as tf

        dtype = DTYPES[self.dtype]
        x = torch.empty(1, self.hidden, dtype=dtype)
        tf.add_rmsnorm(x, torch.empty_like(x), torch.empty(self.hidden, dtype=dtype), 1e-5)
        tf.silu_mul(torch.empty(1, 2 * self.inter, dtype=dtype))


Case = AttentionCase | MatmulCase | FusedCase


def ci_cases() -> list[Case]:
    """A representative set: every kernel and KV format, head dims 64-256, GQA 1-8, both block sizes in
    use, decode with and without splits, prefill, int8 at each row-block size, int4 at two group sizes."""
    return [
        AttentionCase(),  # Llama 3 8B decode
        AttentionCase(splits=8),  # flash decoding (+ the combine kernel)
        AttentionCase(head_dim=64, heads=(32, 8), kv="int8", splits=4),  # Llama 3.2 1B, int8 KV
        AttentionCase(kv="fp8", block_size=32),
        AttentionCase(dtype="fp16", head_dim=96, heads=(8, 8), kv="fp8-bits"),  # GQA 1, fp8 without fp8 units
        AttentionCase(head_dim=256, heads=(8, 4)),  # Gemma-like
        AttentionCase(dtype="fp32", head_dim=64, heads=(12, 4)),  # GQA 3 (a padded group), IEEE dots
        AttentionCase(query_len=512, num_seqs=2),  # prefill
        AttentionCase(head_dim=256, heads=(8, 4), query_len=512, kv="int8"),
        # d256 GQA 4 over 32-slot blocks: spilled up to 836 bytes before tile_shape's wide rule
        AttentionCase(head_dim=256, heads=(32, 8), block_size=32, kv="fp8-bits", query_len=512, num_seqs=2),
        MatmulCase(bits=8, m=1),
        MatmulCase(bits=8, m=1, split_k=4),  # split-K, as a 2048-wide layer at batch 1 on an H100
        MatmulCase(bits=8, m=32, n=4096, k=4096),
        MatmulCase(bits=8, m=64, n=14336, k=4096),
        MatmulCase(bits=4, m=1, group=128),
        MatmulCase(bits=4, m=64, group=32),
        FusedCase(),  # Llama 3 8B
        FusedCase(hidden=2048, inter=8192, dtype="fp16"),
    ]


def full_cases() -> list[Case]:
    """Every axis crossed (several hundred compiles: minutes)."""
    cases: list[Case] = []
    for dtype, d, heads, bs, kv in itertools.product(
        ("bf16", "fp16"),
        (64, 80, 96, 128, 256),
        ((8, 8), (24, 8), (32, 8), (64, 8)),
        (16, 32),
        ("auto", "int8", "fp8", "fp8-bits"),
    ):
        for q_len, splits in ((1, 1), (1, 8), (512, 1)):
            cases.append(AttentionCase(dtype, d, heads, bs, kv, q_len, splits, 2 if q_len > 1 else 1))
    cases += [AttentionCase(dtype="fp32", head_dim=d, kv=kv) for d in (64, 128) for kv in ("auto", "int8")]
    cases += [
        FusedCase(h, i, dtype) for h, i in ((2048, 8192), (4096, 14336), (8192, 28672)) for dtype in DTYPES
    ]
    for dtype, m in itertools.product(("bf16", "fp16"), (1, 8, 16, 32, 64)):
        cases += [MatmulCase(8, m, 4096, 4096, 0, dtype, split) for split in (None, 4)]
        cases += [MatmulCase(4, m, 4096, 4096, g, dtype) for g in (32, 64, 128, 256)]
    return cases


# ---- reading the PTX -----------------------------------------------------------------------------------------

_LOAD = re.compile(r"\b(ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global)\b([^;]*);")
_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_BITS = re.compile(r"\.[bsuf](8|16|32|64)\b")


def loop_lines(ptx: str) -> set[int]:
    """Line numbers inside a loop: from a label to a later branch back to it."""
    lines = ptx.splitlines()
    labels: dict[str, int] = {}
    inside: set[int] = set()
    for i, line in enumerate(lines):
        if m := _LABEL.match(line):
            labels[m.group(1)] = i
        elif (m := _BRANCH.search(line)) and m.group(1) in labels:
            inside.update(range(labels[m.group(1)], i + 1))
    return inside


def load_width(op: str, operands: str) -> int:
    """Bytes one thread moves in a global load (`ld.global[.vN].bB`) or an async copy (`cp.async`)."""
    if op.startswith("cp.async"):
        return int(operands.split(",")[2].strip(), 0)  # dst, src, copy size[, source size]
    bits = _BITS.search(op)
    vec = re.search(r"\.v(\d)", op)
    return (int(bits.group(1)) // 8 if bits else 0) * (int(vec.group(1)) if vec else 1)


def global_loads(ptx: str) -> tuple[Counter, Counter]:
    """Global loads by width in bytes: (whole kernel, inside loops)."""
    inside = loop_lines(ptx)
    total, looped = Counter(), Counter()
    for i, line in enumerate(ptx.splitlines()):
        for m in _LOAD.finditer(line):
            width = load_width(m.group(1), m.group(2))
            total[width] += 1
            if i in inside:
                looped[width] += 1
    return total, looped


def ptxas_report(ptx: str, cap: int) -> dict[str, int | None]:
    """Registers, spill bytes and stack frame from `ptxas -v` (Triton's own ptxas)."""
    import triton

    ptxas = os.environ.get("PTXAS") or str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    info = result.stderr + result.stdout
    if result.returncode:
        raise RuntimeError(f"ptxas failed: {info[-800:]}")

    def grab(pattern: str, group: int = 1) -> int | None:
        m = re.search(pattern, info)
        return int(m.group(group)) if m else None

    spill = r"(\d+) bytes spill stores, (\d+) bytes spill loads"
    return dict(
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(spill, 1),
        spill_loads=grab(spill, 2),
        stack=grab(r"(\d+) bytes stack frame"),
    )


def inspect(name: str, kernel, kwargs: dict, cap: int) -> dict:
    """What one compiled kernel looks like: resources, loads, matrix instructions."""
    ptx = kernel.asm["ptx"]
    total, looped = global_loads(ptx)
    mma = Counter(re.findall(r"\b(wgmma\.[\w.]+|mma\.sync\.[\w.]+)", ptx))
    return dict(
        kernel=name,
        constexprs={k: v for k, v in kwargs.items() if k.isupper()},
        num_warps=kernel.metadata.num_warps,
        num_stages=kernel.metadata.num_stages,
        shared=kernel.metadata.shared,
        **ptxas_report(ptx, cap),
        loads={str(w): n for w, n in sorted(total.items())},
        loop_loads={str(w): n for w, n in sorted(looped.items())},
        mma=sorted(mma),
    )


# ---- checks ---------------------------------------------------------------------------------------------------


def problems(case: Case, record: dict) -> list[str]:
    """What is wrong with one compiled kernel of `case` (empty: nothing)."""
    found = []
    if record["spill_stores"] or record["spill_loads"] or record["stack"]:
        found.append(
            f"{record['kernel']}: spills {record['spill_stores']}/{record['spill_loads']} bytes, "
            f"stack {record['stack']}"
        )
    if record["kernel"] == "_paged_attention_kernel":
        looped = {int(w): n for w, n in record["loop_loads"].items()}
        narrow = {w: n for w, n in looped.items() if w < 4}
        if narrow:
            found.append(f"attention: loads narrower than 4 bytes in the loop {narrow} (unvectorised K/V)")
        align_bytes = record["constexprs"]["ALIGN"] * (
            1 if case.kv != "auto" else DTYPES[case.dtype].itemsize
        )
        if align_bytes >= 16 and not looped.get(16):
            found.append(f"attention: no 16-byte K/V loads in the loop ({looped})")
    return found


# ---- driver ---------------------------------------------------------------------------------------------------


def compile_cases(cases: list[Case], cap: int) -> list[dict]:
    """Compile each case, one record per kernel (or one per failed case, with `error`)."""
    compiled = install_fake_driver(cap)
    records = []
    for case in cases:
        compiled.clear()
        t0 = time.perf_counter()
        kind = {AttentionCase: "attention", MatmulCase: "matmul", FusedCase: "fused"}[type(case)]
        base = dict(case=case.label, kind=kind, params=asdict(case))
        try:
            case.launch()
            rows = [inspect(name, kernel, kwargs, cap) for name, kernel, kwargs in compiled]
        except Exception as exc:  # a compile error is a finding, not a crash of the whole run
            records.append(dict(base, error=f"{type(exc).__name__}: {str(exc)[-1500:]}"))
            continue
        seconds = round(time.perf_counter() - t0, 2)
        for row in rows:
            row.update(base, seconds=seconds, problems=problems(case, row))
            records.append(row)
    return records


def table(records: list[dict]) -> str:
    """One line per compiled kernel."""
    out = [f"{'case':52} {'kernel':26} regs spill smem  stages  loop loads (bytes: count)"]
    for r in records:
        if "error" in r:
            out.append(f"{r['case']:52} COMPILE ERROR: {r['error'].splitlines()[0][:120]}")
            continue
        spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
        loads = " ".join(f"{w}:{n}" for w, n in r["loop_loads"].items()) or "-"
        flag = "  <- " + "; ".join(r["problems"]) if r["problems"] else ""
        out.append(
            f"{r['case']:52} {r['kernel']:26} {r['registers']!s:>4} {spill:>5} {r['shared']:>6} "
            f"{r['num_stages']:>3}     {loads}{flag}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)  # compile for real; must precede the first import of triton
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_compile needs a process whose Triton is not in interpreter mode")
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_compile", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--matrix", choices=("ci", "full"), default="ci")
    ap.add_argument("--cap", type=int, default=90, help="compute capability to compile for (90: H100/H200)")
    ap.add_argument("--json", type=Path, default=None, help="write every record here")
    args = ap.parse_args(argv)
    cases = ci_cases() if args.matrix == "ci" else full_cases()
    t0 = time.perf_counter()
    records = compile_cases(cases, args.cap)
    seconds = time.perf_counter() - t0
    print(table(records))
    errors = [r for r in records if "error" in r]
    flagged = [r for r in records if r.get("problems")]
    print(
        f"{len(cases)} cases, {len(records) - len(errors)} kernels compiled for sm_{args.cap} in {seconds:.1f}s; "
        f"{len(errors)} compile errors, {len(flagged)} kernels with problems"
    )
    if args.json:
        args.json.write_text(json.dumps(dict(cap=args.cap, seconds=seconds, records=records), indent=1))
    return 1 if errors or flagged else 0


if __name__ == "__main__":
    sys.exit(main())
