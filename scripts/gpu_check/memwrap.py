"""`fitllm bench memory` exactly as given on the command line, plus what it does not record on CUDA: each
memory pass's device peak (the bench's RSS figures are host memory), and, at the end, what the elastic engine's
slab release does to the CUDA allocator (allocated vs reserved vs the device's own used bytes), before and
after torch.cuda.empty_cache()."""

import json
import sys
import time

import torch

import benchmarks.memory as bm
from common import device_memory as dev

extra_path = sys.argv[1]
argv = sys.argv[2:]
ENGINES, DEV_STATS = {}, {}
_orig = bm._memory_pass


def patched(engine, requests, concurrency, tag):
    ENGINES[tag] = engine
    before = dev()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    r = _orig(engine, requests, concurrency, tag)
    after = dev()
    if before:
        r["cuda_pass_peak_allocated_growth"] = torch.cuda.max_memory_allocated() - before["allocated"]
        r["cuda_pass_peak_reserved"] = torch.cuda.max_memory_reserved()
        r["cuda_before"], r["cuda_after"] = before, after
    r["ledger_kv_current"] = engine.ledger.current("kv")
    r["graphs"] = engine.graphs is not None
    if engine.graphs is not None:
        r["graph_pool_bytes"] = engine.graphs.pool_bytes
    DEV_STATS[tag] = {
        k: v
        for k, v in r.items()
        if k.startswith("cuda")
        or k in ("graphs", "graph_pool_bytes", "ledger_kv_current", "ledger_peak_bytes")
    }
    return r


bm._memory_pass = patched
from fitllm.cli import main

rc = main(argv)
rel = {}
e = ENGINES.get("elastic")
if e is not None and torch.cuda.is_available():
    torch.cuda.synchronize()
    rel["slabs_before"] = e.pool.num_slabs
    rel["before"] = dev()
    rel["released"] = e.pool.release_idle_slabs(now=time.monotonic() + 1e6)
    e.release_idle_memory()
    torch.cuda.synchronize()
    rel["after_release"] = dev()
    rel["ledger_kv_after_release"] = e.ledger.current("kv")
    torch.cuda.empty_cache()
    rel["after_empty_cache"] = dev()
json.dump(dict(kind="memory_device", rc=rc, passes=DEV_STATS, elastic_release=rel), open(extra_path, "w"))
print("memwrap:", json.dumps(dict(passes=DEV_STATS, elastic_release=rel)), flush=True)
sys.exit(rc)
