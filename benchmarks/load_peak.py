"""`fitllm bench load`: the host memory peak of loading the model with each weight quantization.

Quantizing tensor by tensor while loading should keep the peak near the final resident size: at most the
quantized weights plus one decoder layer in float32 (the issue's bound). Each method loads in a fresh
subprocess (so no method inherits another's heap), with the kernel's RSS high-water mark reset just
before `build_model` and read right after it. RSS also counts a checkpoint's memory-mapped pages the
reader has touched (safetensors: file-backed, reclaimable, dropped once the reader is released; GGUF files
are read with pread and map nothing, fitllm/loader/gguf_reader.py), and the libraries' code pages; the report
gives their growth separately (RssFile). What remains is the weights, a fixed non-weight growth (modules the
loader imports lazily, heap the allocator keeps) and any transient above the final state, which is what
quantizing while loading must keep under one layer in float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_METHODS = "none,int8,int4:32,int4:64,bnb-int8,bnb-nf4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--model", default=None, help="GGUF file or HF folder (default: the default model)")
    g.add_argument("--dtype", default="bfloat16", help="model dtype")
    g.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated METHOD[:GROUP_SIZE]")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def measure_one(model: str | None, dtype: str, method: str) -> dict:
    """Load once in this process and report bytes (run in a fresh process by `run`)."""
    import torch

    from fitllm.config import resolve_dtype
    from fitllm.loader import build_model, open_model
    from fitllm.memory.host import PhaseMemoryProbe, host_memory
    from fitllm.plan.weights import weight_breakdown
    from fitllm.quant import get_quant_method

    name, _, group = method.partition(":")
    source = open_model(model)
    device = torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, device)
    quant = get_quant_method(name, int(group) if group else None, source.config.linear_block_type)
    planned = weight_breakdown(source.config, torch_dtype, quant)
    before = host_memory()
    with PhaseMemoryProbe() as probe:
        model_ = build_model(source, torch_dtype, device, 256, quant=quant)
    after = host_memory()
    weights = sum(p.numel() * p.element_size() for p in model_.parameters())
    layer = model_.layers[0]
    layer_float32 = sum(p.numel() for p in layer.parameters()) * 4  # quantized params count as elements
    if quant.name == "int4" or quant.name == "bnb-nf4":
        layer_float32 *= 2  # two 4-bit codes per stored byte
    mem = probe.result
    file_growth = after.file - before.file  # the checkpoint's mapped pages, not the load's working set
    return {
        "method": quant.describe(),
        "weights": weights,
        "weights_planned": planned.total,
        "one_layer_float32": layer_float32,
        "rss_growth_peak": mem.peak - mem.start,
        "rss_growth_after": mem.end - mem.start,
        "rss_file_growth": file_growth,
        "peak_less_file": mem.peak - mem.start - file_growth,
        "transient": mem.peak - mem.end,  # above what the load leaves behind
        "non_weight_growth": mem.end - mem.start - file_growth - weights,
        "bound": weights + layer_float32,
        "method_of_peak": mem.method,
    }


def run(args: argparse.Namespace) -> int:
    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        code = (
            "import json, sys; from benchmarks.load_peak import measure_one; "
            f"print(json.dumps(measure_one({args.model!r}, {args.dtype!r}, {method!r})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        mib = 2**20
        print(
            f"{r['method']:22} weights {r['weights'] / mib:6.1f} MiB | RSS peak +{r['rss_growth_peak'] / mib:6.1f}: "
            f"file pages {r['rss_file_growth'] / mib:5.1f}, rest {r['peak_less_file'] / mib:6.1f} "
            f"(weights + {r['non_weight_growth'] / mib:4.1f} non-weight) | transient above the end "
            f"{r['transient'] / mib:4.1f} vs one layer fp32 {r['one_layer_float32'] / mib:4.1f} MiB"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0
