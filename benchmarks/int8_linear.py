"""`fitllm bench int8-linear`: the quantized linears' time against bfloat16, by rows per call and path.

`bf16` is PyTorch's bfloat16 matmul (oneDNN), the baseline of every ratio; `bf16-kernel` is fitllm's own
bfloat16 kernel (decode_gemm.c, vdpbf16ps), which an unquantized bfloat16 model uses up to
`BF16_KERNEL_ROWS` rows per call, where it is built.

Decode calls a linear with one row per running request. On CPU, int8 weights can be multiplied three ways,
and which is fastest depends on the rows (`fitllm/quant/int8.py`, `kernel_rows`):
- `aten-int8`: PyTorch's weight-only kernel (`aten._weight_int8pack_mm`), which reads int8 weights directly;
- `vnni`: fitllm's own kernel (fitllm/kernels/decode_gemm.c: activations in two int8 parts, VNNI dot
  products), where it is built;
- `scratch`: convert the weight into a bfloat16 scratch, then a bfloat16 matmul;
- `int8-act`: the activations split into two int8 parts (x ~ s (hi + lo / 254), exact to about bfloat16's
  rounding) and multiplied by the int8 weight with `torch._int_mm` (oneDNN, VNNI on x86), for comparison;
- `fitllm`: what `Int8Method.apply` does (`vnni` or `aten-int8` below `kernel_rows`, else `scratch`);
- `aten-int4`: PyTorch's int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`) at `--group-size`, and
  `int4-fitllm`: what `Int4Method.apply` does around it.
Each path and bfloat16 take turns over `--rounds` rounds (median), so the ratios are side by side; the
second table is each path's weight bytes read per second (int4: codes plus scales and zeros), to set
against the machine's memory bandwidth: a path far below it is bound by its arithmetic, not its reads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The default model's (SmolLM2-135M) linears: fused q/k/v, o, fused gate/up, down: [out, in].
DEFAULT_SHAPES = "960x576,576x576,3072x576,576x1536"
PATHS = (
    "bf16",
    "bf16-kernel",
    "aten-int8",
    "vnni",
    "scratch",
    "int8-act",
    "fitllm",
    "aten-int4",
    "int4-fitllm",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes, summed")
    g.add_argument("--rows", default="1,4,8,16,32,48,64", help="comma-separated rows per call")
    g.add_argument("--calls", type=int, default=50, help="calls per shape timed in each round")
    g.add_argument("--rounds", type=int, default=7, help="rounds, the paths taking turns")
    g.add_argument("--group-size", type=int, default=32, help="int4's group size (the default model's: 32)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def int8_activation_matmul(x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale[:, None]).T with x split into two int8 parts, both multiplied in one `_int_mm` call."""
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30).div_(127.0)
    xs = xf.div_(sx)
    hi = xs.round()
    lo = xs.sub_(hi).mul_(254.0).round_()
    acc = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), q_t).float()
    m = x.shape[0]
    return acc[m:].div_(254.0).add_(acc[:m]).mul_(sx).mul_(scale).to(x.dtype)


class _Layer(nn.Module):
    """A bare module holding one int8 weight as Int8Method stores it."""


def _paths(n: int, k: int, rows: int, gen: torch.Generator, group: int) -> tuple[dict, dict]:
    """Each path as a zero-argument callable on one random [n, k] weight and [rows, k] input; and the
    weight bytes each path reads."""
    from fitllm.model.registry import default_dtype
    from fitllm.quant.cpu_kernels import bf16_kernel, int8_kernel
    from fitllm.quant.int4 import Int4Method
    from fitllm.quant.int8 import Int8Method

    kernel, kernel16 = int8_kernel(), bf16_kernel()

    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    method = Int8Method()
    layer = _Layer()
    method.create_weights(layer, n, k)
    method.load_rows(layer, 0, w.float())
    layer.weight_scale.data = layer.weight_scale.data.bfloat16()
    q, scale = layer.weight.data, layer.weight_scale.data
    q_t, scale32 = q.t(), scale.float()
    scratch = torch.empty(n, k, dtype=torch.bfloat16)

    def via_scratch() -> torch.Tensor:
        scratch.copy_(q)
        return F.linear(x, scratch).mul_(scale)

    int4, layer4 = Int4Method(group), _Layer()
    with default_dtype(torch.bfloat16):
        int4.create_weights(layer4, n, k)
    int4.load_rows(layer4, 0, w.float())
    int4.finish_loading(layer4)
    assert layer4.int4_kernel_layout, "the int4 CPU kernel is not available in this PyTorch"
    q4, sz4 = layer4.weight.data, layer4.weight_scale_zeros.data
    int8_bytes = q.numel() + scale.numel() * scale.element_size()
    int4_bytes = q4.numel() + sz4.numel() * sz4.element_size()
    reads = {
        "bf16": n * k * 2,
        "bf16-kernel": n * k * 2,
        "scratch": int8_bytes,
        "int8-act": int8_bytes,
        "fitllm": int8_bytes,
    }
    reads["vnni"] = int8_bytes
    reads |= {"aten-int8": int8_bytes, "aten-int4": int4_bytes, "int4-fitllm": int4_bytes}
    fns = {
        "bf16": lambda: F.linear(x, w),
        "bf16-kernel": lambda: kernel16(x, w),
        "aten-int8": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "vnni": lambda: kernel(x, q, scale),
        "scratch": via_scratch,
        "int8-act": lambda: int8_activation_matmul(x, q_t, scale32),
        "fitllm": lambda: method.apply(layer, x),
        "aten-int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, group, sz4),
        "int4-fitllm": lambda: int4.apply(layer4, x),
    }
    if kernel is None:
        del fns["vnni"]
    if kernel16 is None:
        del fns["bf16-kernel"]
    return fns, reads


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from fitllm.quant.cpu_kernels import bf16_kernel, int8_kernel

    # fitllm's kernels where they are built here (else `fitllm` is PyTorch's kernel and `vnni` and
    # `bf16-kernel` are left out)
    built_here = {"vnni": int8_kernel() is not None, "bf16-kernel": bf16_kernel() is not None}
    paths = [p for p in PATHS if built_here.get(p, True)]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    result: dict[str, dict] = {}
    print(f"{'rows':>5} " + " ".join(f"{p:>11}" for p in paths) + "   (time / bf16 time, median of rounds)")
    bandwidth: dict[int, dict[str, float]] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        built = [_paths(n, k, rows, gen, args.group_size) for n, k in shapes]
        calls = [fns for fns, _ in built]
        reads = {p: sum(r[p] for _, r in built) for p in paths}
        for fns in calls:  # warm-up: oneDNN and the scratch settle
            for fn in fns.values():
                fn()
        seconds: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.rounds):
            for path in paths:
                start = time.perf_counter()
                for fns in calls:
                    for _ in range(args.calls):
                        fns[path]()
                seconds[path].append((time.perf_counter() - start) / args.calls)
        median = {p: statistics.median(s) for p, s in seconds.items()}
        ratios = {p: median[p] / median["bf16"] for p in paths}
        bandwidth[rows] = {p: reads[p] / median[p] / 1e9 for p in paths}
        result[str(rows)] = {
            "ratio_to_bf16": ratios,
            "bf16_us_per_layer_set": median["bf16"] * 1e6,
            "us_per_layer_set": {p: median[p] * 1e6 for p in paths},
            "weight_gb_per_s": bandwidth[rows],
        }
        print(f"{rows:>5} " + " ".join(f"{ratios[p]:>11.2f}" for p in paths))
    print(f"{'rows':>5} " + " ".join(f"{p:>11}" for p in paths) + "   (weight GB read per second)")
    for rows, gbps in bandwidth.items():
        print(f"{rows:>5} " + " ".join(f"{gbps[p]:>11.2f}" for p in paths))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shapes": args.shapes, "threads": torch.get_num_threads(),
                                         "group_size": args.group_size, "rows": result}, indent=2))  # fmt: skip
    return 0
