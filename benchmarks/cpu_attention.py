"""`fitllm bench attention`: one layer's decode attention over the paged cache, per context length and
batch: fitllm's CPU kernel (`kernel`, fitllm/kernels/decode_attention.c), the reference backend's PyTorch path without it (`torch`:
gather + SDPA, or bmm-softmax-bmm for padded groups), and the bfloat16 bmm-softmax-bmm both replaced (issue 24).

All paths read the same slab through the same gather rows (built by `TorchMetadataBuilder` from a batch
layout over shuffled blocks), and are timed in alternating rounds; the ratios are what to read on a shared
machine. `bmm (previous)` is kept as the first baseline: K/V gathered in the model dtype, bmm, scale, a
float32 masked softmax, bmm. With --kv-cache-dtype int8 / fp8 the kernel does not serve (`kernel` is then the
PyTorch path too) and both PyTorch paths fold the scales in (the previous one in the model dtype, the current
one in float32 on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--contexts", default="128,512,2048", help="comma-separated context lengths")
    g.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    g.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    g.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8"))
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--calls", type=int, default=50, help="calls timed per round")
    g.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    g.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def previous_decode(attn, q: torch.Tensor, dg) -> torch.Tensor:
    """The decode path before issue 24: bmm in the model dtype, float32 softmax (the baseline)."""
    from fitllm.model.attention import torch_backend as tb

    n, ctx = dg.num, dg.context
    kvh, group, d = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    shape = (kvh * n, ctx, d)
    if attn.kv_format.quantized:
        keys, vals, k_scale, v_scale = tb._decode_kv(attn, dg, q.dtype)
    else:
        keys, vals = tb._gather(attn, 0, dg.rows).view(shape), tb._gather(attn, 1, dg.rows).view(shape)
        k_scale = v_scale = None
    qg = q.view(n, kvh, group, d).transpose(0, 1).reshape(kvh * n, group, d)
    scores = torch.bmm(qg, keys.transpose(1, 2))
    scores = (scores * attn.scale).float() if k_scale is None else scores.float() * (k_scale * attn.scale)
    mask = dg.mask.unsqueeze(0).expand(kvh, n, ctx).reshape(kvh * n, 1, ctx)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    if v_scale is not None:
        probs *= v_scale
    out = torch.bmm(probs.to(q.dtype), vals)
    return out.view(kvh, n, group, d).transpose(0, 1).reshape(n, attn.num_heads, d)


def _with_kernel(on: bool):
    """The reference backend's decode with fitllm's CPU attention kernel on or off."""
    from fitllm.model.attention import cpu_decode
    from fitllm.model.attention import torch_backend as tb

    built = cpu_decode.decode_attention_kernel()

    def decode(attn, q: torch.Tensor, dg) -> torch.Tensor:
        saved = cpu_decode._kernel[:]
        cpu_decode._kernel[:] = [built if on else None]
        try:
            return tb._decode(attn, q, dg)
        finally:
            cpu_decode._kernel[:] = saved

    return decode


def _case(args: argparse.Namespace, batch: int, context: int):
    """A bound PagedAttention over one random slab, queries, and the decode group of `batch` requests whose
    contexts end at `context` (the others a little shorter, so a batch has padding to mask)."""
    from fitllm.memory.kv.format import KVCacheFormat
    from fitllm.model.attention import BatchLayout, PagedAttention, metadata_builder

    dtype, bs = getattr(torch, args.dtype), args.block_size
    contexts = [context - 7 * i for i in range(batch)]
    blocks = sum(-(-c // bs) for c in contexts)
    g = torch.Generator().manual_seed(batch * 100003 + context)
    order = torch.randperm(blocks, generator=g).tolist()  # scattered blocks, as a long-running pool has
    layout = BatchLayout(bs, num_decodes=batch)
    for c in contexts:
        table, order = order[: -(-c // bs)], order[-(-c // bs) :]
        layout.add_sequence(table, c - 1, c)
    fmt = KVCacheFormat(args.kv_cache_dtype, dtype, args.head_dim)
    raw = torch.randn(2, blocks * bs, args.kv_heads, args.head_dim, generator=g).to(dtype)
    attn = PagedAttention(args.heads, args.kv_heads, args.head_dim, args.head_dim**-0.5)
    attn.kv_slabs, attn.kv_format = [fmt.encode(raw)], fmt
    meta = metadata_builder("torch", args.kv_heads, None, blocks * bs).build(layout, torch.device("cpu"))
    q = torch.randn(batch, args.heads, args.head_dim, generator=g).to(dtype)
    return attn, q, meta.decode_groups[0]


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    paths = {"bmm (previous)": previous_decode, "torch": _with_kernel(False), "kernel": _with_kernel(True)}
    result = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                attn, q, dg = _case(args, batch, context)
                outs = {name: fn(attn, q, dg).float() for name, fn in paths.items()}
                err = max((outs[n] - outs["bmm (previous)"]).abs().max().item() for n in ("torch", "kernel"))
                times: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(args.rounds):
                    for name, fn in paths.items():
                        times[name].append(_time(functools.partial(fn, attn, q, dg), args.calls) * 1e6)
                us = {name: statistics.median(ts) for name, ts in times.items()}
                result.append(
                    {
                        "batch": batch,
                        "context": context,
                        "us_median": us,
                        "us_rounds": times,
                        "kernel_vs_torch": us["torch"] / us["kernel"],
                        "kernel_vs_bmm": us["bmm (previous)"] / us["kernel"],
                        "max_abs_diff": err,
                    }
                )
                print(
                    f"batch {batch:2}  context {context:5}  bmm (previous) {us['bmm (previous)']:8.1f} us  "
                    f"torch {us['torch']:8.1f} us  kernel {us['kernel']:8.1f} us  "
                    f"kernel x{us['torch'] / us['kernel']:.2f} vs torch  (max |diff| {err:.2e})"
                )
    print(
        f"one layer's decode attention, {args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, "
        f"{args.dtype}, KV {args.kv_cache_dtype}, {torch.get_num_threads()} threads"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
