"""The fused int8 and int4 weight-only matmuls for CUDA (fitllm.quant.triton_matmul.py), run in Triton's interpreter on
CPU (conftest sets TRITON_INTERPRET=1 without CUDA) or on the GPU where there is one, against the layer's own
dequantized weight; and which calls the int8 and int4 layers route to them."""

from __future__ import annotations

import pytest
import torch
from test_quant_layers import BF16_TOL, QUANT_TOL, _build, _randn, _rel

from fitllm.quant import int4, int8
from fitllm.quant.int4 import SCRATCH_ROWS, Int4Method, int4_path
from fitllm.quant.int8 import TRITON_ROWS, Int8Method, int8_path, kernel_rows, quantize_int8
from fitllm.quant.triton_matmul import int4_matmul as _int4_matmul
from fitllm.quant.triton_matmul import int8_matmul as _int8_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def int8_matmul(x, q, scale):
    return _int8_matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE)).cpu()


def int4_matmul(x, q, scale_zeros, group_size):
    return _int4_matmul(x.to(DEVICE), q.to(DEVICE), scale_zeros.to(DEVICE), group_size).cpu()


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 100, 300), (7, 64, 128), (16, 33, 130), (40, 96, 200), (70, 48, 64)]
)
def test_int8_matmul_matches_the_dequantized_product_float32(m, n, k):
    w = _randn(n, k, seed=m)
    q, scale = quantize_int8(w)
    x = _randn(m, k, seed=m + 1)
    out = int8_matmul(x, q, scale.float())
    ref = x @ (q.float() * scale.float()[:, None]).T
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6
    assert _rel(out, x @ w.T) < QUANT_TOL["int8"]  # and it is the quantized weight, not a copy of w
    assert _rel(out, x @ w.T) > 1e-4


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
def test_int8_matmul_on_a_loaded_layer_bfloat16(kind):
    """The kernel takes Int8Method's parameters as they are (int8 weight [N, K], scale [N] in the model dtype)."""
    layer, w = _build(kind, Int8Method(), torch.bfloat16)
    deq = layer.quant.dequantize(layer)
    for rows in (1, 5, 33):
        x = _randn(rows, layer.in_features, seed=rows).to(torch.bfloat16)
        out = int8_matmul(x, layer.weight, layer.weight_scale)
        assert out.dtype == torch.bfloat16
        assert _rel(out, x.float() @ deq.T) < BF16_TOL
        assert _rel(out, layer(x)) < BF16_TOL  # the CPU path gives the same product


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_on_a_loaded_layer(kind, dtype):
    """The plain layout as Int4Method stores it off the CPU kernel (GPU layers keep it), against the layer's
    dequantized weight: a wrong nibble order, group index or zero convention gives errors of order 1."""
    method = Int4Method(32)
    layer, w = _build(kind, method, dtype, finish=False)
    assert not layer.int4_kernel_layout
    deq = method.dequantize(layer)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    for rows in (1, 9, 40):
        x = _randn(rows, layer.in_features, seed=rows + 3).to(dtype)
        out = int4_matmul(x, layer.weight, layer.weight_scale_zeros, 32)
        assert out.dtype == dtype and out.shape == (rows, w.shape[0])
        assert _rel(out, x.float() @ deq.T) < tol
        assert _rel(out, x.float() @ w.T) < QUANT_TOL["int4"]


def test_decode_sized_calls_on_cuda_take_the_triton_kernels(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = 576 * 576
    assert int8_path(cpu, 1, small, True) == "aten"
    assert int8_path(cpu, 1, small, False) == "scratch"  # the aten kernel wants the scale's dtype
    assert int8_path(cpu, kernel_rows(small), small, True) == "scratch"
    assert int8_path(cuda, 1, small, True) == "triton"
    assert int8_path(cuda, TRITON_ROWS, small, True) == "triton"
    assert int8_path(cuda, TRITON_ROWS + 1, small, True) == "scratch"  # prefill: the dense GEMM wins
    assert int4_path(cpu, True, torch.bfloat16) == "aten"
    assert int4_path(cpu, True, torch.bfloat16, rows=SCRATCH_ROWS - 1) == "aten"
    assert (
        int4_path(cpu, True, torch.bfloat16, rows=SCRATCH_ROWS) == "scratch"
    )  # prefill: unpack + dense GEMM
    assert int4_path(cpu, True, torch.bfloat16, rows=SCRATCH_ROWS, out_features=80) == "aten"  # a tail block
    assert int4_path(cpu, False, torch.float32) == "dequantize"
    assert int4_path(cuda, False, torch.bfloat16) == "triton"
    assert int4_path(cuda, False, torch.float16) == "triton"
    assert int4_path(cuda, False, torch.bfloat16, group_size=16) == "dequantize"  # a K block is one group
    # Without Triton, CUDA falls back to the dense paths rather than failing.
    monkeypatch.setattr(int8, "HAS_TRITON", False)
    monkeypatch.setattr(int4, "HAS_TRITON", False)
    assert int8_path(cuda, 1, small, True) == "scratch"
    assert int4_path(cuda, False, torch.bfloat16) == "dequantize"


@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize("bits", [8, 4])
def test_split_k_sums_to_the_unsplit_product(split_k, bits):
    """Split-K (decode-sized calls on a big GPU): each split's float32 partials over its share of K, summed;
    the same product as one program over all of K, also when K does not divide evenly into the splits."""
    from fitllm.quant.int4 import pack_plain, quantize_int4
    from fitllm.quant.triton_matmul import _weight_only_matmul

    m, n, k = 3, 40, 640 if bits == 8 else 576
    w = _randn(n, k, seed=5)
    x = _randn(m, k, seed=6)
    if bits == 8:
        q, scale = quantize_int8(w)
        args = (q.to(DEVICE), scale.float().to(DEVICE))
        kw = dict(bits=8, group=0, block_k=128)
    else:
        codes, sz = quantize_int4(w, 32)
        args = (pack_plain(codes).to(DEVICE), sz.to(DEVICE))
        kw = dict(bits=4, group=32, block_k=64)
    whole = _weight_only_matmul(x.to(DEVICE), *args, split_k=1, **kw).cpu()
    split = _weight_only_matmul(x.to(DEVICE), *args, split_k=split_k, **kw).cpu()
    assert split.shape == whole.shape == (m, n) and split.dtype == torch.float32
    assert _rel(split, whole) < 1e-6


def test_choose_split_k():
    """The rule: a 2048-wide layer at batch 1 on an H100 (64 tiles of 32 columns, 132 SMs) splits K in 4, for
    256 programs; big outputs, short K and the interpreter (one SM) do not split."""
    from fitllm.quant.triton_matmul import MAX_SPLIT_K, MIN_K_BLOCKS_PER_SPLIT, choose_split_k

    assert choose_split_k(64, 2048, 128, 132) == 4
    assert choose_split_k(448, 4096, 128, 132) == 1  # 14336 columns: 448 programs already
    assert choose_split_k(64, 256, 128, 132) == 1  # two K blocks: nothing to split
    assert choose_split_k(64, 2048, 128, 1) == 1
    for tiles in (1, 8, 64, 128, 256):
        for k in (128, 1024, 4096, 14336):
            s = choose_split_k(tiles, k, 128, 132)
            assert 1 <= s <= MAX_SPLIT_K and s & (s - 1) == 0
            assert s == 1 or (tiles * s <= 2 * 132 and -(-k // 128) >= s * MIN_K_BLOCKS_PER_SPLIT)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m,n,split_k", [(1, 48, 1), (3, 40, 2), (17, 33, 1)])
def test_int4_matmul_takes_scale_and_zero_out_of_the_dot_exactly(group, m, n, split_k):
    """The kernel computes s * sum x (q - 8) + z * sum x per group (one K block per group, bytes read once,
    nibbles paired with even and odd channels): equal to the product with the dequantized weight."""
    from fitllm.quant.triton_matmul import int4_matmul as kernel

    torch.manual_seed(group + m)
    k = 2 * group if group < 256 else 256
    x = torch.randn(m, k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    sz = torch.randn(k // group, n, 2)
    scale, zero = (sz[..., i].T.repeat_interleave(group, 1) for i in (0, 1))
    ref = x @ ((q.float() - 8) * scale + zero).T
    out = kernel(x, packed, sz, group, split_k=split_k)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
