"""Short human summary of results.jsonl and the test logs (printed; the script also appends it to summary.txt)."""

import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = []
P = lines.append
tl = out / "tests.log"
if tl.exists():
    txt = tl.read_text(errors="replace")
    for m in re.finditer(
        r"^=+ (.*(?:passed|failed|error|skipped).*) =+$|^(\d+ (?:passed|failed).*)$", txt, re.M
    ):
        P("tests: " + (m.group(1) or m.group(2)))
    for m in re.finditer(r"^(FAILED|ERROR) (\S+)", txt, re.M):
        P(f"  {m.group(1)} {m.group(2)}")
rows = []
rp = out / "results.jsonl"
if rp.exists():
    for l in rp.read_text().splitlines():
        try:
            rows.append(json.loads(l))
        except Exception:
            pass


def f(x, n=1):
    return "-" if x is None else (f"{x:.{n}f}" if isinstance(x, float) else str(x))


for r in rows:
    k = r.get("kind")
    if k == "info":
        P(f"device: {r.get('device')}  SMs {r.get('sms')}  torch {r.get('torch')}  triton {r.get('triton')}")
    elif k == "bandwidth":
        P(f"measured D2D bandwidth (read+write): {r['GBps']} GB/s")
    elif k in ("attn_decode", "attn_decode_int8kv"):
        P(
            f"attn {k[5:]:16} {r.get('variant', '?'):7} b{r.get('batch')} ctx {r.get('ctx')} splits {r.get('splits')} (engine picks {r.get('engine_choice', '-')}): "
            + (f"{r['us']} us, KV {r['kv_GBps']} GB/s" if "us" in r else r.get("error", ""))
        )
    elif k == "attn_prefill":
        P(
            f"attn prefill {r.get('variant'):10} {r.get('tokens')} tok: "
            + (f"{r['us']} us, {r['TFLOPs']} TFLOP/s" if "us" in r else r.get("error", ""))
        )
    elif k == "gemm":
        P(
            f"gemm {r['layer']:11} m={r['m']:<3} bf16 {r['bf16_us']:>8} us ({r['bf16_GBps']} GB/s)  int8 {r['int8_us']:>8} us ({r['int8_GBps']} GB/s)  x{r['int8_speedup']} (no split-K {r.get('int8_nosplit_us')} us)"
        )
    elif k == "gemm_int4":
        P(
            f"gemm int4 {r['layer']} m={r.get('m')} "
            + (
                f"{r['int4_us']} us ({r['int4_GBps']} GB/s) vs bf16 {r['bf16_us']} us: x{r['int4_speedup']}"
                + (
                    f"; tinygemm {r['tinygemm_us']} us (triton/tinygemm x{r['tinygemm_vs_triton']}, "
                    f"max diff {r['tinygemm_maxdiff']:.3g})"
                    if "tinygemm_us" in r
                    else ""
                )
                if "int4_us" in r
                else r.get("error", "")
            )
        )
    elif k == "graph_small_kernels":
        P(
            f"in a CUDA graph: {r['op']} "
            + (
                f"{r['us_per_call']} us/call, {r['kernels_per_call']} kernels"
                if "us_per_call" in r
                else r.get("error", "")
            )
        )
    elif k == "checkpoint":
        P(f"checkpoint {r['size']}: {r['seconds']}s")
    elif k == "decode":
        if "error" in r:
            P(
                f"decode {r.get('size')} {r.get('quantization', r.get('system'))}: ERROR {r['error'].splitlines()[-1] if r['error'] else ''}"
            )
            continue
        if r.get("system") == "transformers":
            P(
                f"decode {r['size']} transformers: {f(r['tokens_per_s'])} tok/s = {f(r['fraction_of_roofline'] * 100)}% of roofline"
            )
            continue
        s = (
            f"decode {r['size']} {r['quantization']:5} graphs={'on' if r['cuda_graphs'] else 'off'} async={'on' if r['async_on'] else 'off'}: "
            f"{f(r['tokens_per_s'])} tok/s ({f(r['ms_per_token'], 2)} ms) = {f(r['fraction_of_roofline'] * 100)}% of roofline {f(r['roofline_tokens_per_s'])}"
        )
        if "graph_replay_ms" in r:
            s += f"; decoder graph {r['graph_replay_ms']} ms, lm_head {r.get('lm_head_ms')} ms"
        if "eager_step_kernels" in r:
            s += f"; eager step {r['eager_step_kernels']} kernels"
        P(s)
        if "graph_pool_measured" in r:
            P(
                f"    graph pool measured {r['graph_pool_measured'] / 2**20:.1f} MiB vs planned {r['graph_pool_planned'] / 2**20:.1f} MiB"
            )
        if "allocator_reserved_delta" in r:
            P(
                f"    ledger {r['ledger_total'] / 2**30:.2f} GiB vs allocator allocated {r['allocator_allocated_delta'] / 2**30:.2f} / reserved {r['allocator_reserved_delta'] / 2**30:.2f} / device used {r['device_used_delta'] / 2**30:.2f} GiB; engine start {r.get('engine_start_s')}s"
            )
    elif k == "throughput":
        for row in r.get("results", []):
            P(
                f"throughput N={row.get('concurrency')} {row.get('system')}: {f(row.get('output_tok_per_s'))} tok/s"
                + (f", x{row['ratio']:.2f} transformers" if "ratio" in row else "")
                + f", TTFT p50 {f(row.get('ttft_p50_s'), 3)}s, TPOT p50 {f((row.get('tpot_p50_s') or 0) * 1e3, 2)} ms"
            )
    elif k == "memory":
        s = r.get("summary", {})
        for name in ("static", "elastic"):
            if name in r:
                x = r[name]
                P(
                    f"memory {name}: ledger peak {x['ledger_peak_bytes'] / 2**30:.2f} GiB, TPOT {x.get('tpot_mean_s', 0) * 1e3:.2f} ms, {x.get('output_tok_per_s', 0):.0f} tok/s, util at peak {x.get('kv_utilization_at_peak', 0):.0%}"
                )
        if s:
            P(
                f"memory elastic vs static: peak ledger {s.get('peak_ledger_reduction', 0):.1%} lower, TPOT x{s.get('tpot_ratio', 0):.3f}"
            )
    elif k == "memory_device":
        for tag, d in r.get("passes", {}).items():
            if "cuda_pass_peak_allocated_growth" in d:
                P(
                    f"memory {tag} (device): pass peak growth {d['cuda_pass_peak_allocated_growth'] / 2**30:.2f} GiB, graphs {d.get('graphs')}, pool {d.get('graph_pool_bytes', 0) / 2**20:.0f} MiB"
                )
        rel = r.get("elastic_release") or {}
        if rel:
            g = lambda d, k: d.get(k, 0) / 2**30
            P(
                f"elastic release: {rel.get('released')} slabs; reserved {g(rel['before'], 'reserved'):.2f} -> {g(rel['after_release'], 'reserved'):.2f} GiB"
                f" (empty_cache -> {g(rel['after_empty_cache'], 'reserved'):.2f}); device used {g(rel['before'], 'device_used'):.2f} -> {g(rel['after_release'], 'device_used'):.2f} -> {g(rel['after_empty_cache'], 'device_used'):.2f} GiB"
            )
    elif k == "step_error":
        P(f"step {r.get('step')}: {r.get('error')}")
print("\n".join(lines))
