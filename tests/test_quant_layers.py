"""Weight quantization's building blocks (fitllm/quant): the int8 and int4 codecs, the quantized linear layers
loaded shard by shard, and PyTorch's int4 CPU kernel layout. The engine end to end: test_quant.py.

Measured figures behind each tolerance are in the comments next to it (this machine, torch 2.13 CPU).
"""

from __future__ import annotations

import pytest
import torch

from fitllm.model.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from fitllm.model.registry import default_dtype
from fitllm.quant import get_quant_method
from fitllm.quant.base import QuantMethod
from fitllm.quant.cpu_kernels import int4_kernel
from fitllm.quant.int4 import (
    KERNEL_BLOCK_N,
    SCRATCH_ROWS,
    Int4Method,
    cpu_kernel_available,
    dequantize_int4,
    pack_plain,
    quantize_int4,
    suggest_group_sizes,
    unpack_plain,
)
from fitllm.quant.int8 import KERNEL_ROWS_SMALL, Int8Method, kernel_rows, quantize_int8

EPS = 1e-5  # float32 slack, relative to |w|, on "error <= scale / 2" (w / s and q * s each round once)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Float32 gaussian, whatever the default dtype is."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _method(name: str) -> QuantMethod:
    return Int8Method() if name == "int8" else Int4Method(32)


# ---- the codecs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 7), (33, 64), (128, 300)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0])
def test_quantize_int8_range_saturation_and_error(shape, scale):
    w = _randn(*shape, seed=shape[0], scale=scale)
    w[0, 0] = 0.0  # zeros quantize to exactly 0
    if shape[0] > 2:
        w[1] = 0.0  # an all-zero row must not divide by zero
        w[2] *= 1e-3  # a row far smaller than the rest keeps its own scale
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    nonzero = w.abs().amax(dim=1) > 0
    # Symmetric per-row scale: the row's largest |w| maps to exactly +-127.
    assert (q.abs().amax(dim=1)[nonzero] == 127).all()
    assert (q[~nonzero] == 0).all()
    assert q[0, 0] == 0
    err = (w - q.float() * s[:, None]).abs()
    assert (err <= s[:, None] / 2 + EPS * w.abs()).all(), (err / s[:, None]).max()
    assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("group", [2, 32, 64])
@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_quantize_int4_range_and_group_error(group, offset):
    n, k = 48, 128
    w = _randn(n, k, seed=group) + offset  # offset: asymmetric groups (min > 0) use the zero point
    w[3, :group] = 0.7  # a constant group: scale clamps, the value comes back through the zero point
    q, sz = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (n, k)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert sz.dtype == torch.float32 and sz.shape == (k // group, n, 2)
    deq = dequantize_int4(q, sz, group)
    # Never worse than plain min/max rounding, group by group (the least-squares grid search includes it).
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp(min=1e-10)
    minmax = ((g - lo) / step).round().clamp(0, 15) * step + lo
    err = (deq.reshape(n, k // group, group) - g).square().sum(-1)
    base = (minmax - g).square().sum(-1)
    assert (err <= base * (1 + 1e-4) + 1e-10).all()
    if group >= 32:  # over many channels the search finds a strictly better grid (-30% on Gaussian rows)
        assert err.sum() < 0.9 * base.sum(), (err.sum() / base.sum()).item()
    # Clipping an outlier costs it at most two min/max steps (measured worst: 1.44 steps over 2000 rows).
    assert ((deq - w).abs() <= 2 * step.expand_as(g).reshape(n, k) + EPS * w.abs()).all()
    assert torch.allclose(deq[3, :group], torch.full((group,), 0.7), atol=1e-6)


def test_pack_plain_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (9, 34), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_plain(q)
    assert packed.dtype == torch.uint8 and packed.shape == (9, 17)
    assert torch.equal(unpack_plain(packed), q)
    # Channel 2j in the low nibble, 2j + 1 in the high nibble (the layout the loader stores).
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    every = torch.arange(256, dtype=torch.int32)
    pairs = torch.stack([every & 15, every >> 4], dim=1).to(torch.uint8).reshape(1, 512)
    assert torch.equal(pack_plain(pairs).flatten().to(torch.int32), every)
    assert torch.equal(unpack_plain(pack_plain(pairs)), pairs)


def test_int4_group_size_errors_name_the_flag():
    with pytest.raises(ValueError, match="--quant-group-size") as exc:
        ColumnParallelLinear(96, 64, quant=Int4Method(64))
    assert "96" in str(exc.value) and "e.g. 32" in str(exc.value)  # suggests a size that divides 96
    for bad in (48, 0, 1, 3, 96):
        with pytest.raises(ValueError, match="--quant-group-size") as exc:
            Int4Method(bad)
        assert "--quantization int8" in str(exc.value)
    # Not a power of two: the error names the valid sizes nearest the one asked for...
    with pytest.raises(ValueError, match=r"got 48: use e\.g\. 32 or 64, or --quantization int8"):
        Int4Method(48)
    with pytest.raises(ValueError, match=r"got 1000: use e\.g\. 128 or 256"):
        Int4Method(1000)
    # ... and, when the model's widths are known, sizes that divide them (96 = 32 * 3: not 64).
    with pytest.raises(ValueError, match=r"got 48: use e\.g\. 16 or 32 \(dividing every linear"):
        Int4Method(48, (96, 96, 288))
    with pytest.raises(ValueError, match="no power of two divides"):
        Int4Method(48, (96, 31))
    assert suggest_group_sizes(100, (576, 576, 1536)) == (32, 64)  # the default model's widths
    with pytest.raises(ValueError, match="--quant-group-size"):
        get_quant_method("int4", 48)
    with pytest.raises(ValueError, match="--quantization"):
        get_quant_method("int3")
    assert get_quant_method("int4").group_size == 64  # the documented default
    assert get_quant_method(None).name == get_quant_method("none").name == "none"
    # On the meta device too: the planner must refuse what the loader would refuse.
    with torch.device("meta"), pytest.raises(ValueError, match="--quant-group-size"):
        RowParallelLinear(96, 32, quant=Int4Method(64))


# ---- the quantized linear layers ------------------------------------------------------------------------

HIDDEN = 128


def _build(kind: str, quant: QuantMethod, dtype: torch.dtype, seed: int = 0, finish: bool = True):
    """A linear of `kind` on real memory, loaded shard by shard as the Llama loader does; returns it and the
    full float32 [out, in] weight it was loaded from."""
    with default_dtype(dtype):
        if kind == "qkv":  # 4 query heads, 2 KV heads of 32: q 128 rows, k 64, v 64
            layer = QKVParallelLinear(HIDDEN, 32, 4, 2, bias=False, quant=quant)
            sizes = [("q", 128), ("k", 64), ("v", 64)]
        elif kind == "gate_up":
            layer = MergedColumnParallelLinear(HIDDEN, [192, 192], quant=quant)
            sizes = [(0, 192), (1, 192)]
        elif kind == "down":
            layer = RowParallelLinear(384, HIDDEN, quant=quant)
            sizes = [(None, HIDDEN)]
        else:
            raise AssertionError(kind)
    shards = [
        (sid, _randn(rows, layer.in_features, seed=seed * 10 + i)) for i, (sid, rows) in enumerate(sizes)
    ]
    for sid, w in shards:
        layer.weight_loader(layer.weight, w, sid)
    if finish:
        layer.quant.finish_loading(layer)
    return layer, torch.cat([w for _, w in shards])


# Relative L2 error of the bfloat16 layer against x @ W^T with the original float32 W, gaussian weights
# and inputs, measured over these three layers, 3 seeds and 1 to 40 rows: int8 0.0065-0.0088
# (per-channel scale, in_features 128 and 384), int4 in groups of 32 0.076-0.091 (single rows vary
# most). Against the layer's own dequantized weight only bfloat16 rounding is left: <= 0.0025; between
# batch sizes <= 0.0039. Tolerances carry 1.6x-4x margin; a wrong shard offset, nibble order or scale
# layout gives errors of order 1.
QUANT_TOL = {"int8": 0.015, "int4": 0.15}
BF16_TOL = 0.01


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_linear_matches_float_matmul(kind, method):
    layer, w = _build(kind, _method(method), torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # _build restored it
    assert layer.weight.device.type == "cpu" and not layer.weight.is_meta
    assert layer.weight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    deq = layer.quant.dequantize(layer)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert 0 < _rel(deq, w) < QUANT_TOL[method]  # quantized (not a copy), and close
    x = _randn(40, layer.in_features, seed=99).to(torch.bfloat16)
    full = layer(x)
    assert full.dtype == torch.bfloat16 and full.shape == (40, w.shape[0])
    cut = kernel_rows(w.numel())
    assert cut == KERNEL_ROWS_SMALL  # these small layers
    for rows in (1, 8, cut - 1, cut, 40):
        y = layer(x[:rows])
        assert _rel(y, x[:rows].float() @ w.T) < QUANT_TOL[method], rows
        assert _rel(y, x[:rows].float() @ deq.T) < BF16_TOL, rows
        # Every batch size agrees with the 40-row batch (int8: kernel below `cut` rows, scratch from
        # it on). Measured <= 0.004 relative, a couple of bfloat16 ulps per element.
        assert _rel(y, full[:rows]) < BF16_TOL, rows
    # Leading dimensions are kept.
    y3 = layer(x[:30].reshape(2, 15, -1))
    assert y3.shape == (2, 15, w.shape[0])
    assert _rel(y3.reshape(30, -1), full[:30]) < BF16_TOL


def test_int8_small_batches_use_the_kernel_and_large_ones_the_scratch():
    quant = Int8Method()
    layer, w = _build("down", quant, torch.bfloat16)
    cut = kernel_rows(w.numel())
    assert kernel_rows(4096 * 4096) < cut  # large layers switch to the scratch earlier
    x = _randn(cut, layer.in_features, seed=5).to(torch.bfloat16)
    small = layer(x[: cut - 1])
    assert quant.scratch.buffer is None  # the int8 kernel: no bfloat16 copy of the weight
    large = layer(x)
    buf = quant.scratch.buffer
    assert buf is not None and buf.dtype == torch.bfloat16 and buf.numel() == w.numel()
    assert _rel(small, large[: cut - 1]) < BF16_TOL
    # The scratch is shared: a second, smaller layer reuses it.
    with default_dtype(torch.bfloat16):
        other = ColumnParallelLinear(HIDDEN, 64, quant=quant)
    other.weight_loader(other.weight, _randn(64, HIDDEN, seed=6))
    xo = _randn(cut, HIDDEN, seed=7).to(torch.bfloat16)
    assert _rel(other(xo), xo.float() @ quant.dequantize(other).T) < BF16_TOL
    assert quant.scratch.buffer is buf
    # Float32 activations (model dtype float32) take PyTorch's kernel, exact up to summation order, against
    # float32 scales (fitllm's VNNI kernel, whose activations are ~16 bits, serves bfloat16 only).
    layer32, w32 = _build("down", Int8Method(), torch.float32)
    assert layer32.weight_scale.dtype == torch.float32
    x32 = _randn(3, layer32.in_features, seed=8)
    assert _rel(layer32(x32), x32 @ layer32.quant.dequantize(layer32).T) < 1e-5
    assert _rel(layer32(x32), x32 @ w32.T) < QUANT_TOL["int8"]


@pytest.mark.parametrize("kind", ["qkv", "gate_up"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_shards_quantize_like_the_whole_matrix(kind, method, dtype):
    """Rows are quantized independently, so loading q, k, v (or gate, up) one by one stores exactly what
    quantizing the concatenated matrix stores."""
    fused, w = _build(kind, _method(method), dtype, finish=False)
    with default_dtype(dtype):
        whole = ColumnParallelLinear(HIDDEN, w.shape[0], quant=_method(method))
    whole.weight_loader(whole.weight, w)
    # The stored bytes are the codec's own output (plain layout while loading).
    if method == "int8":
        q, s = quantize_int8(w)
        assert torch.equal(fused.weight, q)
        assert torch.equal(fused.weight_scale, s.to(dtype))
        names = ("weight", "weight_scale")
    else:
        q, sz = quantize_int4(w, 32)
        assert torch.equal(fused.weight, pack_plain(q))
        assert torch.equal(fused.weight_scale_zeros, sz.to(dtype))
        names = ("weight", "weight_scale_zeros")
    for name in names:
        assert torch.equal(getattr(fused, name), getattr(whole, name)), name
    fused.quant.finish_loading(fused)
    whole.quant.finish_loading(whole)
    for name in names:
        assert torch.equal(getattr(fused, name), getattr(whole, name)), name
    assert torch.equal(fused.quant.dequantize(fused), whole.quant.dequantize(whole))


# ---- PyTorch's int4 CPU kernel --------------------------------------------------------------------------


@pytest.mark.skipif(not cpu_kernel_available(), reason="this PyTorch has no int4 CPU kernel")
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
def test_int4_cpu_kernel_layout_round_trip(kind):
    """Pins the kernel's packed layout: what finish_loading repacks, the kernel reads back as the same
    weights (dequantize unpacks through the kernel with an identity batch)."""
    layer, w = _build(kind, Int4Method(32), torch.bfloat16, finish=False)
    assert layer.int4_kernel_layout is False
    plain_bytes = layer.weight.detach().clone()
    plain = layer.quant.dequantize(layer)  # pure torch, from the plain layout
    x = _randn(5, layer.in_features, seed=3).to(torch.bfloat16)
    y_plain = layer(x)  # plain layout: the pure-torch path even with bfloat16 activations
    layer.quant.finish_loading(layer)
    assert layer.int4_kernel_layout is True
    assert layer.weight.shape == plain_bytes.shape and layer.weight.dtype == torch.uint8
    assert not torch.equal(layer.weight, plain_bytes)  # really repacked
    kernel = layer.quant.dequantize(layer)
    # The kernel returns bfloat16: the same values rounded once. Measured: exactly plain rounded to
    # bfloat16; allowed: one bfloat16 ulp. A nibble, row or group misplacement is off by whole scales.
    assert kernel.shape == plain.shape
    assert ((kernel - plain).abs() <= plain.abs() * 2**-7).all(), (kernel - plain).abs().max()
    y_kernel = layer(x)
    assert _rel(y_kernel, y_plain) < BF16_TOL  # measured 0.0026-0.0027
    assert _rel(y_kernel, x.float() @ w.T) < QUANT_TOL["int4"]
    # finish_loading twice is harmless (the loader may call it on a model that is already repacked).
    packed = layer.weight.detach().clone()
    layer.quant.finish_loading(layer)
    assert torch.equal(layer.weight, packed)

    # The pure-torch fallback: a float32 model never uses the kernel; same weights, float32 scales.
    layer32, _ = _build(kind, Int4Method(32), torch.float32)
    assert layer32.int4_kernel_layout is False
    assert torch.equal(layer32.weight, plain_bytes)
    y32 = layer32(x.float())
    assert y32.dtype == torch.float32
    # Differs from the kernel by bfloat16 scales and output rounding: measured 0.0024-0.0027.
    assert _rel(y_kernel, y32) < BF16_TOL
    assert _rel(layer32.quant.dequantize(layer32), plain) < 2**-8  # measured 0.0019: bf16 scales


@pytest.mark.skipif(not cpu_kernel_available(), reason="this PyTorch has no int4 CPU kernel")
@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
def test_int4_large_calls_unpack_into_the_scratch_like_the_kernel(kind):
    """From SCRATCH_ROWS rows on, a layer in the kernel's layout is unpacked into the shared bfloat16 scratch
    (prefill): the unpacked weight is the dequantized weight rounded once to bfloat16, and the product is the
    kernel's own within bfloat16 rounding."""
    quant = Int4Method(32)
    layer, w = _build(kind, quant, torch.bfloat16, finish=False)
    plain = dequantize_int4(unpack_plain(layer.weight.data), layer.weight_scale_zeros.data, 32)  # float32
    quant.finish_loading(layer)
    assert layer.int4_kernel_layout and layer.out_features % KERNEL_BLOCK_N == 0
    x = _randn(SCRATCH_ROWS + 5, layer.in_features, seed=11).to(torch.bfloat16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight, 32, layer.weight_scale_zeros)
    small = layer(x[: SCRATCH_ROWS - 1])
    assert quant.scratch.buffer is None  # below SCRATCH_ROWS: a kernel, no bfloat16 copy
    if int4_kernel() is None:
        assert torch.equal(small, kernel[: SCRATCH_ROWS - 1])  # PyTorch's
    else:  # fitllm's on the same layout: float32 weights, activations in two int8 parts
        assert _rel(small, kernel[: SCRATCH_ROWS - 1]) < BF16_TOL
        assert _rel(small, x[: SCRATCH_ROWS - 1].float() @ plain.T) < BF16_TOL
    large = layer(x)
    buf = quant.scratch.buffer
    assert buf is not None and buf.dtype == torch.bfloat16 and buf.numel() == w.numel()
    # The scratch holds W^T; each element (q - 8) * scale + zero, computed in float and rounded once: at most
    # one bfloat16 rounding (2^-9 relative) from the float32 dequantization (measured: equal to it rounded).
    unpacked = buf.view(layer.in_features, layer.out_features).t().float()
    assert ((unpacked - plain).abs() <= plain.abs() * 2**-8).all(), (unpacked - plain).abs().max()
    assert torch.equal(unpacked, plain.to(torch.bfloat16).float())
    # The product: the kernel's (float32 weights, bfloat16 output) within bfloat16 rounding of the weights.
    assert _rel(large, kernel) < BF16_TOL
    assert _rel(large, x.float() @ plain.T) < BF16_TOL
    assert _rel(large, x.float() @ w.T) < QUANT_TOL["int4"]
    # Leading dimensions and a second (smaller) layer sharing the scratch.
    y3 = layer(x[:SCRATCH_ROWS].reshape(2, SCRATCH_ROWS // 2, -1))
    assert y3.shape == (2, SCRATCH_ROWS // 2, layer.out_features)
    assert _rel(y3.reshape(SCRATCH_ROWS, -1), kernel[:SCRATCH_ROWS]) < BF16_TOL
    with default_dtype(torch.bfloat16):
        other = ColumnParallelLinear(HIDDEN, 64, quant=quant)
    other.weight_loader(other.weight, _randn(64, HIDDEN, seed=12))
    quant.finish_loading(other)
    xo = _randn(SCRATCH_ROWS, HIDDEN, seed=13).to(torch.bfloat16)
    ko = torch.ops.aten._weight_int4pack_mm_for_cpu(xo, other.weight, 32, other.weight_scale_zeros)
    assert _rel(other(xo), ko) < BF16_TOL and quant.scratch.buffer is buf


@pytest.mark.skipif(not cpu_kernel_available(), reason="this PyTorch has no int4 CPU kernel")
def test_int4_output_rows_not_in_blocks_of_64_keep_the_kernel():
    """The kernel packs a tail of fewer than 64 output rows differently: such layers never unpack, and the
    planner counts no scratch for them."""
    quant = Int4Method(32)
    with default_dtype(torch.bfloat16):
        layer = ColumnParallelLinear(HIDDEN, 80, quant=quant)  # 64 + 16: the kernel takes it
    w = _randn(80, HIDDEN, seed=14)
    layer.weight_loader(layer.weight, w)
    quant.finish_loading(layer)
    assert layer.int4_kernel_layout
    x = _randn(SCRATCH_ROWS + 1, HIDDEN, seed=15).to(torch.bfloat16)
    assert _rel(layer(x), x.float() @ quant.dequantize(layer).T) < BF16_TOL
    assert quant.scratch.buffer is None
    assert quant.scratch_elements(layer, "cpu") == 0


def test_int4_kernel_skipped_when_rows_are_not_tiles_of_16():
    with default_dtype(torch.bfloat16):
        layer = ColumnParallelLinear(HIDDEN, 40, quant=Int4Method(32))
    w = _randn(40, HIDDEN, seed=4)
    layer.weight_loader(layer.weight, w)
    layer.quant.finish_loading(layer)
    assert layer.int4_kernel_layout is False
    x = _randn(3, HIDDEN, seed=5).to(torch.bfloat16)
    assert _rel(layer(x), x.float() @ w.T) < QUANT_TOL["int4"]


@pytest.mark.parametrize("group", [16, 512])
def test_int4_group_sizes_the_cpu_kernel_does_not_take_still_run(group):
    """aten's int4 CPU kernel takes groups of 32-256 only; other sizes stay on the pure-torch path."""
    in_features = max(group, HIDDEN)
    with default_dtype(torch.bfloat16):
        layer = ColumnParallelLinear(in_features, 32, quant=Int4Method(group))
    w = _randn(32, in_features, seed=group)
    layer.weight_loader(layer.weight, w)
    layer.quant.finish_loading(layer)
    assert layer.int4_kernel_layout is False
    x = _randn(2, in_features, seed=1).to(torch.bfloat16)
    assert _rel(layer(x), x.float() @ layer.quant.dequantize(layer).T) < BF16_TOL
