"""`fitllm bench int8-linear`: one int8 linear layer's time against bfloat16, by rows per call and path.

Decode calls a linear with one row per running request. On CPU, int8 weights can be multiplied three ways,
and which is fastest depends on the rows (`fitllm/quant/int8.py`, `kernel_rows`):
- `aten-int8`: PyTorch's weight-only kernel (`aten._weight_int8pack_mm`), which reads int8 weights directly;
- `scratch`: convert the weight into a bfloat16 scratch, then a bfloat16 matmul;
- `int8-act`: the activations split into two int8 parts (x ~ s (hi + lo / 254), exact to about bfloat16's
  rounding) and multiplied by the int8 weight with `torch._int_mm` (oneDNN, VNNI on x86), for comparison;
- `fitllm`: what `Int8Method.apply` does (one of the first two, by `kernel_rows`).
Each path and bfloat16 take turns over `--rounds` rounds (median), so the ratios are side by side.
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
PATHS = ("bf16", "aten-int8", "scratch", "int8-act", "fitllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes, summed")
    g.add_argument("--rows", default="1,4,8,16,32,48,64", help="comma-separated rows per call")
    g.add_argument("--calls", type=int, default=50, help="calls per shape timed in each round")
    g.add_argument("--rounds", type=int, default=7, help="rounds, the paths taking turns")
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


def _paths(n: int, k: int, rows: int, gen: torch.Generator) -> dict:
    """Each path as a zero-argument callable on one random [n, k] weight and [rows, k] input."""
    from fitllm.quant.int8 import Int8Method

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

    return {
        "bf16": lambda: F.linear(x, w),
        "aten-int8": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "scratch": via_scratch,
        "int8-act": lambda: int8_activation_matmul(x, q_t, scale32),
        "fitllm": lambda: method.apply(layer, x),
    }


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    result: dict[str, dict] = {}
    print(f"{'rows':>5} " + " ".join(f"{p:>10}" for p in PATHS) + "   (time / bf16 time, median of rounds)")
    for rows in (int(r) for r in args.rows.split(",")):
        calls = [_paths(n, k, rows, gen) for n, k in shapes]
        for fns in calls:  # warm-up: oneDNN and the scratch settle
            for fn in fns.values():
                fn()
        seconds: dict[str, list[float]] = {p: [] for p in PATHS}
        for _ in range(args.rounds):
            for path in PATHS:
                start = time.perf_counter()
                for fns in calls:
                    for _ in range(args.calls):
                        fns[path]()
                seconds[path].append((time.perf_counter() - start) / args.calls)
        median = {p: statistics.median(s) for p, s in seconds.items()}
        ratios = {p: median[p] / median["bf16"] for p in PATHS}
        result[str(rows)] = {"ratio_to_bf16": ratios, "bf16_us_per_layer_set": median["bf16"] * 1e6}
        print(f"{rows:>5} " + " ".join(f"{ratios[p]:>10.2f}" for p in PATHS))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shapes": args.shapes, "threads": torch.get_num_threads(),
                                         "rows": result}, indent=2))  # fmt: skip
    return 0
