"""Batch-1 decode vs the bandwidth roofline, as `fitllm bench roofline` measures it (same engine config, prompt,
timing and byte count: benchmarks/roofline.py), for chosen variants only, plus what the bench does not print:
the decode graph's own GPU time, kernels per eager step, the graph pool measured vs planned, and the ledger
against the CUDA allocator. One JSON line per variant."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--size", default="1b")
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--variants", default="none:graphs:on,none:eager:on,int8:graphs:on")
ap.add_argument("--hf", action="store_true")
ap.add_argument("--prompt-tokens", type=int, default=512)
ap.add_argument("--decode-tokens", type=int, default=128)
ap.add_argument("--root", default="/tmp/fitllm-roofline")
ap.add_argument("--out", default=None)
A = ap.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OUT = open(A.out, "a") if A.out else None


def emit(**kw):
    line = json.dumps(kw)
    if OUT:
        OUT.write(line + "\n")
        OUT.flush()
    print(line, flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


sys.path.insert(0, str(Path(__file__).parent))
from common import device_memory as mem
from fastckpt import build

from benchmarks.roofline import decode_engine, hf_decode, time_decode
from fitllm.engine.request import SamplingParams
from fitllm.memory.offload.bandwidth import memory_bandwidth
from fitllm.plan.planner import graph_pool_bytes

t0 = time.time()
folder = build(A.size, Path(A.root), A.dtype)
emit(kind="checkpoint", size=A.size, folder=str(folder), seconds=round(time.time() - t0, 1))
bw = memory_bandwidth(DEV, nbytes=1 << 30)
emit(
    kind="bandwidth",
    device=torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
    GBps=round(bw / 1e9, 1),
)
args = argparse.Namespace(
    decode_tokens=A.decode_tokens, prompt_tokens=A.prompt_tokens, device=str(DEV), dtype=A.dtype
)


for v in A.variants.split(","):
    quant, mode, overlap = v.split(":")
    eager = mode == "eager"
    rec = dict(
        kind="decode", size=A.size, quantization=quant, graphs_requested=not eager, async_scheduling=overlap
    )
    try:
        base = mem()
        t_start = time.time()
        engine = decode_engine(folder, args, quant, eager, overlap)
        rec["engine_start_s"] = round(time.time() - t_start, 1)
        seconds, bpt = time_decode(engine, args)
        tps = A.decode_tokens / seconds
        rec.update(
            cuda_graphs=engine.graphs is not None,
            async_on=engine.async_scheduling,
            backend=engine.attention_backend,
            tokens_per_s=round(tps, 1),
            ms_per_token=round(1e3 / tps, 3),
            bytes_per_token=bpt,
            roofline_tokens_per_s=round(bw / bpt, 1),
            fraction_of_roofline=round(tps * bpt / bw, 3),
        )
        # the ledger against the allocator (engine alive, idle)
        m = mem()
        snap = engine.ledger.snapshot()
        rec["ledger_total"] = snap.total
        rec["ledger"] = dict(snap.current)
        rec["ledger_peak_total"] = snap.peak_total
        rec["budget"] = snap.budget
        if m:
            rec["allocator_allocated_delta"] = m["allocated"] - base.get("allocated", 0)
            rec["allocator_reserved_delta"] = m["reserved"] - base.get("reserved", 0)
            rec["device_used_delta"] = m["device_used"] - base.get("device_used", 0)
            rec["max_allocated"] = torch.cuda.max_memory_allocated()
        if engine.graphs is not None:
            mc = engine.model_config
            rec["graph_pool_measured"] = engine.graphs.pool_bytes
            rec["graph_pool_planned"] = graph_pool_bytes(
                mc, engine.dtype, 8, engine.max_model_len, engine.block_size
            )
            rec["graph_sizes"] = engine.graphs.sizes
            if DEV.type == "cuda":
                replay, _ = engine.graphs._graphs[1]
                for _ in range(3):
                    replay()
                sync()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(50):
                    replay()
                e1.record()
                sync()
                rec["graph_replay_ms"] = round(e0.elapsed_time(e1) / 50, 3)  # decoder forward alone, batch 1
                lm = engine.model.compute_logits
                h = torch.randn(1, mc.hidden_size, device=DEV, dtype=engine.dtype)
                e0.record()
                for _ in range(50):
                    lm(h)
                e1.record()
                sync()
                rec["lm_head_ms"] = round(e0.elapsed_time(e1) / 50, 3)
        elif DEV.type == "cuda":
            # kernels and GPU time of one eager decode forward (batch 1), via the profiler

            prompt = [(7 * i) % 1000 + 3 for i in range(64)]
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            engine.step()
            engine.step()
            sync()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
            ) as prof:
                engine.step()
                sync()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            rec["eager_step_kernels"] = len(kern)
            rec["eager_step_kernel_us"] = round(
                sum(e.time_range.elapsed_us() for e in kern), 1
            )  # GPU busy time of the step
            by = {}
            for e in kern:
                key = e.name[:40]
                by[key] = by.get(key, 0) + 1
            rec["eager_step_top_kernels"] = sorted(by.items(), key=lambda kv: -kv[1])[:12]
            while engine.has_unfinished_requests():
                engine.step()
        del engine
    except Exception as e:
        import traceback

        rec["error"] = traceback.format_exc()[-1500:]
    import gc

    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    emit(**rec)

if A.hf:
    try:
        r = hf_decode(folder, args)
        r["roofline_tokens_per_s"] = round(bw / r["bytes_per_token"], 1)
        r["fraction_of_roofline"] = round(r["tokens_per_s"] / r["roofline_tokens_per_s"], 3)
        emit(kind="decode", size=A.size, **r)
    except Exception:
        import traceback

        emit(kind="decode", size=A.size, system="transformers", error=traceback.format_exc()[-1500:])
