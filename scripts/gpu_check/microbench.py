"""Kernel-level figures on the GPU, each a JSON line: decode/prefill attention (fitllm's kernel with its K/V
alignment hint, "aligned", and without it, "unaligned": the layout's `align` forced to 1), the flash-decoding
split rule against the old one (256 keys per split at least), int8/int4 weight-only matmuls vs bf16 cuBLAS,
and the cost of a tiny kernel inside a CUDA graph. --smoke runs tiny shapes on CPU under TRITON_INTERPRET=1
(checks the script only)."""

import argparse
import json
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--out", default=None)
ap.add_argument("--work", default="/tmp")
A = ap.parse_args()
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OUT = open(A.out, "a") if A.out else sys.stdout


def emit(**kw):
    line = json.dumps(kw)
    if OUT is not sys.stdout:
        OUT.write(line + "\n")
        OUT.flush()
    print(line, flush=True)


import triton

from fitllm.model.attention import triton_kernels as ta
from fitllm.memory.kv.layout import PagedKVLayout
from fitllm.quant import triton_matmul as tm
from fitllm.quant.int8 import quantize_int8


def bench(fn, reps=None):
    if DEV.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=60)  # ms
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


class Unaligned(PagedKVLayout):
    """The same cache, with the kernels told nothing about row alignment (the code before issue 23)."""

    @property
    def align(self):
        return 1


VARIANTS = ("aligned", "unaligned")


def old_num_splits(num_seqs, num_kv_heads, max_context, num_sms):
    """choose_num_splits before issue 23: at least 256 keys per split."""
    programs, splits = max(1, num_seqs * num_kv_heads), 1
    while splits < 64 and programs * splits < 2 * num_sms and max_context >= 2 * 256 * splits:
        splits *= 2
    return splits


NSM = torch.cuda.get_device_properties(DEV).multi_processor_count if DEV.type == "cuda" else 132
emit(
    kind="info",
    device=torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu",
    sms=NSM,
    torch=torch.__version__,
    triton=triton.__version__,
)


def attn_setup(batch, ctx, qlen=1, H=32, KVH=8, D=128, bs=16, kv="auto", dtype=torch.bfloat16):
    from fitllm.memory.kv.format import KVCacheFormat

    fmt = KVCacheFormat(kv, dtype, D)
    nblocks = batch * -(-ctx // bs)
    slots = nblocks * bs + bs
    slab = fmt.encode(torch.randn(1, 2, slots, KVH, D, device=DEV, dtype=dtype)).contiguous()
    anchor = torch.empty(1, dtype=fmt.storage_dtype, device=DEV)
    layout = PagedKVLayout(anchor, torch.zeros(1, dtype=torch.int64, device=DEV), slots, KVH, fmt.entry_width)
    layout.bind(0, slab)
    unaligned = Unaligned(anchor, layout.slab_offsets, slots, KVH, fmt.entry_width)
    perm = torch.randperm(nblocks, device=DEV).to(torch.int32)
    bt = perm.view(batch, -1)
    T = batch * qlen
    q = torch.randn(T, H, D, device=DEV, dtype=dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    qs = torch.arange(0, T + 1, qlen, dtype=torch.int32, device=DEV)
    kv_bytes = batch * ctx * KVH * fmt.entry_width * fmt.storage_dtype.itemsize * 2
    return (
        dict(
            q=q,
            aligned=layout,
            unaligned=unaligned,
            bt=bt,
            seq_lens=seq_lens,
            qs=qs,
            qlen=qlen,
            bs=bs,
            kv=kv,
            D=D,
        ),
        kv_bytes,
        slab,
    )


def attn_time(variant, s, splits):
    def f():
        ta.paged_attention(
            s["q"],
            s[variant],
            0,
            kv_cache_dtype=s["kv"],
            block_tables=s["bt"],
            seq_lens=s["seq_lens"],
            query_start=s["qs"],
            max_query_len=s["qlen"],
            block_size=s["bs"],
            scale=s["D"] ** -0.5,
            num_splits=splits,
        )

    return bench(f)


sm = (lambda x: max(1, x // 512)) if A.smoke else (lambda x: x)  # smoke: ctx 1 to 64
# 1. decode attention, batch 1 (GQA 4:1, d128: Llama 3 8B / 3.2 1B attention), and batch 64
for batch, ctx in [(1, 657), (1, 4096), (1, 32768), (64, 1024)]:
    ctx = sm(ctx) if A.smoke else ctx
    if A.smoke and batch == 64:
        batch = 2
    s, nbytes, keep = attn_setup(batch, ctx)
    choice = ta.choose_num_splits(batch, 8, ctx, NSM)
    old = old_num_splits(batch, 8, ctx, NSM)
    for splits in sorted({choice, old}):
        for name in VARIANTS:
            try:
                ms = attn_time(name, s, splits)
                emit(
                    kind="attn_decode",
                    variant=name,
                    batch=batch,
                    ctx=ctx,
                    splits=splits,
                    engine_choice=choice,
                    old_rule=old,
                    us=round(ms * 1e3, 2),
                    kv_GBps=round(nbytes / (ms * 1e-3) / 1e9, 1),
                )
            except Exception as e:
                emit(
                    kind="attn_decode", variant=name, batch=batch, ctx=ctx, splits=splits, error=repr(e)[:300]
                )
    del s, keep

# 1b. int8 KV decode, batch 1, 4096
s, nbytes, keep = attn_setup(1, sm(4096), kv="int8")
for name in VARIANTS:
    try:
        splits = ta.choose_num_splits(1, 8, sm(4096), NSM)
        ms = attn_time(name, s, splits)
        emit(
            kind="attn_decode_int8kv",
            variant=name,
            batch=1,
            ctx=sm(4096),
            splits=splits,
            us=round(ms * 1e3, 2),
            kv_GBps=round(nbytes / (ms * 1e-3) / 1e9, 1),
        )
    except Exception as e:
        emit(kind="attn_decode_int8kv", variant=name, error=repr(e)[:300])
del s, keep

# 2. prefill attention: one 2048-token causal prompt vs torch SDPA (flash) on dense tensors
P = 16 if A.smoke else 2048
s, nbytes, keep = attn_setup(1, P, qlen=P)
flops = 4 * 32 * 128 * P * P / 2  # causal
for name in VARIANTS:
    try:
        ms = attn_time(name, s, 1)
        emit(
            kind="attn_prefill",
            variant=name,
            tokens=P,
            us=round(ms * 1e3, 1),
            TFLOPs=round(flops / (ms * 1e-3) / 1e12, 1),
        )
    except Exception as e:
        emit(kind="attn_prefill", variant=name, error=repr(e)[:300])
qd = torch.randn(1, 32, P, 128, device=DEV, dtype=torch.bfloat16)
kd = torch.randn(1, 8, P, 128, device=DEV, dtype=torch.bfloat16)
try:
    ms = bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True)
    )
    emit(
        kind="attn_prefill",
        variant="torch_sdpa",
        tokens=P,
        us=round(ms * 1e3, 1),
        TFLOPs=round(flops / (ms * 1e-3) / 1e12, 1),
    )
except Exception as e:
    emit(kind="attn_prefill", variant="torch_sdpa", error=repr(e)[:300])
del s, keep

# 3. weight-only matmuls vs bf16 cuBLAS (decode rows 1/16/64; Llama 3.2 1B and 3.1 8B layer shapes)
shapes = {
    "1b.qkv": (3072, 2048),
    "1b.o": (2048, 2048),
    "1b.gate_up": (16384, 2048),
    "1b.down": (2048, 8192),
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
}
for name, (n, k) in shapes.items():
    if A.smoke:
        n, k = n // 32, k // 32
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    q, sc = quantize_int8(w)
    sc = sc.to(torch.bfloat16)
    for m in (1,) if A.smoke else (1, 64):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        t_bf = bench(lambda: torch.nn.functional.linear(x, w))
        t_i8 = bench(lambda: tm.int8_matmul(x, q, sc))  # split-K by the rule
        t_i8_whole = bench(lambda: tm.int8_matmul(x, q, sc, split_k=1))
        emit(
            kind="gemm",
            layer=name,
            m=m,
            n=n,
            k=k,
            bf16_us=round(t_bf * 1e3, 2),
            int8_us=round(t_i8 * 1e3, 2),
            bf16_GBps=round(n * k * 2 / (t_bf * 1e-3) / 1e9),
            int8_GBps=round(n * k / (t_i8 * 1e-3) / 1e9),
            int8_speedup=round(t_bf / t_i8, 2),
            int8_nosplit_us=round(t_i8_whole * 1e3, 2),
        )
    if name.startswith("8b") and not A.smoke:
        from fitllm.quant.int4 import pack_plain, quantize_int4

        try:
            q4, sz = quantize_int4(w.float(), 128)  # fitted on the GPU, stored on the host
            packed = pack_plain(q4).to(DEV)
            sz = sz.to(DEV, torch.bfloat16)
            # PyTorch's own CUDA int4 kernel (tinygemm) on the same codes: its scale/zero convention is
            # fitllm's ((q - 8) * scale + zero); its packing puts channel 2j in the high nibble. Issue 23
            # item 4 routes int4 calls per shape to whichever of the two these rows show faster.
            tiny = None
            if hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                q4d = q4.to(DEV)
                tiny = torch.ops.aten._convert_weight_to_int4pack((q4d[:, 0::2] << 4 | q4d[:, 1::2]).contiguous(), 8)
            for m in (1, 16, 64, 512):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                t_bf = bench(lambda: torch.nn.functional.linear(x, w))
                t_i4 = bench(lambda: tm.int4_matmul(x, packed, sz, 128))
                row = dict(
                    kind="gemm_int4",
                    layer=name,
                    m=m,
                    n=n,
                    k=k,
                    bf16_us=round(t_bf * 1e3, 2),
                    int4_us=round(t_i4 * 1e3, 2),
                    int4_GBps=round(n * k / 2 / (t_i4 * 1e-3) / 1e9),
                    int4_speedup=round(t_bf / t_i4, 2),
                )
                if tiny is not None:
                    t_tg = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, tiny, 128, sz))
                    diff = (torch.ops.aten._weight_int4pack_mm(x, tiny, 128, sz) - tm.int4_matmul(x, packed, sz, 128))
                    row.update(tinygemm_us=round(t_tg * 1e3, 2), tinygemm_vs_triton=round(t_i4 / t_tg, 2),
                               tinygemm_maxdiff=float(diff.abs().max()))  # fmt: skip
                emit(**row)
        except Exception as e:
            emit(kind="gemm_int4", layer=name, error=repr(e)[:300])
    del w, q

# 4. a tiny kernel inside a CUDA graph, and fitllm's RMSNorm / rotary per call (graph-replayed)
if DEV.type == "cuda":
    from fitllm.model.layers import RMSNorm, RotaryEmbedding

    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    norm = RMSNorm(4096, 1e-5).to(DEV, torch.bfloat16)
    rot = RotaryEmbedding(128, 8192, 500000.0)
    rot.build(DEV, torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.long, device=DEV)
    qh = torch.randn(1, 32, 128, device=DEV, dtype=torch.bfloat16)
    kh = torch.randn(1, 8, 128, device=DEV, dtype=torch.bfloat16)
    cases = {
        "tiny_add": (lambda: x.add_(0.0), 1),
        "rmsnorm_fitllm": (lambda: norm(x, x), 1),
        "rotary_fitllm": (lambda: rot(pos, qh, kh), 1),
    }
    for cname, (fn, _) in cases.items():
        try:
            N = 200
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(N):
                    fn()
            ms = bench(g.replay)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            emit(
                kind="graph_small_kernels",
                op=cname,
                us_per_call=round(ms * 1e3 / N, 2),
                kernels_per_call=kernels,
            )
        except Exception as e:
            emit(kind="graph_small_kernels", op=cname, error=repr(e)[:300])
emit(kind="done")
