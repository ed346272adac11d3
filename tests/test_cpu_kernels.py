"""fitllm's own CPU kernels (fitllm/kernels/decode_gemm.c, built by fitllm/quant/cpu_kernels.py): their
numbers against a float64 reference and against PyTorch's int8 / int4 kernels, the shapes they must cover
(int8: a K tail that is not a multiple of 64, every remainder of its 2-row x 4-column blocks; int4: group
sizes, several 64-row blocks; bfloat16: K tails, odd K, every remainder of its 4 x 4 blocks), and where
Int8Method / Int4Method / UnquantizedMethod use them."""

from __future__ import annotations

import pytest
import torch

from fitllm.model.registry import default_dtype
from fitllm.quant import cpu_kernels
from fitllm.quant.base import UnquantizedMethod
from fitllm.quant.cpu_kernels import (
    bf16_gemm_op,
    bf16_kernel,
    int4_gemm_op,
    int4_kernel,
    int8_gemm_op,
    int8_kernel,
)
from fitllm.quant.int4 import Int4Method, dequantize_int4, int4_path, unpack_plain
from fitllm.quant.int8 import Int8Method, int8_path, kernel_rows, quantize_int8

needs_kernel = pytest.mark.skipif(
    int8_kernel() is None, reason="no AVX-512 VNNI CPU or C compiler here: fitllm's int8 kernel is not built"
)
needs_int4_kernel = pytest.mark.skipif(
    int4_kernel() is None,
    reason="no AVX-512 VNNI + VBMI CPU or C compiler: fitllm's int4 kernel is not built",
)

needs_bf16_kernel = pytest.mark.skipif(
    bf16_kernel() is None, reason="no AVX-512 BF16 CPU or C compiler: fitllm's bfloat16 kernel is not built"
)


def _case(n: int, k: int, m: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, k // 2] = 40.0  # an outlier feature, as hidden states have: the row's scale follows it
    return x, q, scale


def _bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|y - x W^T| allowed per element: the two-part activation (each element within max|x_row| / 64516)
    times the row's sum of |w|."""
    w = q.double() * scale.double()[:, None]
    return x.double().abs().amax(1, keepdim=True) / 64516 * w.abs().sum(1)


@needs_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (7, 1000), (33, 64), (130, 70), (5, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_int8_kernel_float32_within_its_activation_bound(n, k, m):
    x, q, scale = _case(n, k, m, torch.float32, seed=n + k + m)
    got = int8_kernel()(x, q, scale)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    err = (got.double() - want).abs()
    assert (err <= _bound(x, q, scale) + 1e-5 * want.abs() + 1e-6).all()
    # Not trivially within it: the activations were quantized (a float32 matmul is ~1e-7 off).
    assert err.max() > 1e-6


@needs_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (960, 576), (576, 1536), (49, 128)])
@pytest.mark.parametrize("m", [1, 4, 7])
def test_int8_kernel_bfloat16_matches_pytorchs_int8_kernel(n, k, m):
    """bfloat16 activations and scales, bfloat16 out: as close to aten._weight_int8pack_mm as two roundings
    to bfloat16 (each 2^-9 relative) allow."""
    x, q, scale = _case(n, k, m, torch.bfloat16, seed=7 * n + m)
    s16 = scale.bfloat16()
    got = int8_kernel()(x, q, s16)
    ref = torch.ops.aten._weight_int8pack_mm(x, q, s16)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    exact = x.double() @ (q.double() * s16.double()[:, None]).T
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + _bound(x, q, s16) + 1e-3).all()
    assert ((got.double() - ref.double()).abs() <= 2**-7 * exact.abs() + _bound(x, q, s16) + 1e-3).all()


@needs_kernel
def test_int8_kernel_zero_row_and_mixed_dtypes():
    x, q, scale = _case(64, 192, 3, torch.bfloat16, seed=1)
    x[1] = 0
    got = int8_kernel()(x, q, scale)  # bfloat16 activations, float32 scales
    assert torch.equal(got[1], torch.zeros(64, dtype=torch.bfloat16))
    assert int8_kernel()(x[:0], q, scale).shape == (0, 64)  # no rows: nothing to do, no error
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    assert ((got.double() - want).abs() <= 2**-8 * want.abs() + _bound(x, q, scale) + 1e-3).all()


@needs_kernel
def test_int8_method_takes_the_kernel_for_small_calls_only():
    cpu = torch.device("cpu")
    small = 576 * 576
    assert int8_path(cpu, 1, small, True, vnni=True) == "vnni"
    assert int8_path(cpu, 1, small, False, vnni=True) == "vnni"  # any of its dtypes, unlike aten's
    assert int8_path(cpu, kernel_rows(small) - 1, small, True, vnni=True) == "vnni"
    assert int8_path(cpu, kernel_rows(small), small, True, vnni=True) == "scratch"
    assert int8_path(cpu, 1, small, True, vnni=False) == "aten"
    # Float32 activations keep PyTorch's kernel (exact to float32; the split activations are ~16 bits).
    method32, layer32 = Int8Method(), torch.nn.Module()
    method32.create_weights(layer32, 96, 128)
    method32.load_rows(layer32, 0, torch.randn(96, 128))
    x32 = torch.randn(2, 128)
    assert torch.equal(
        method32.apply(layer32, x32),
        torch.ops.aten._weight_int8pack_mm(x32, layer32.weight, layer32.weight_scale),
    )
    method, layer = Int8Method(), torch.nn.Module()
    method.create_weights(layer, 96, 128)
    method.load_rows(layer, 0, torch.randn(96, 128))
    layer.weight_scale.data = layer.weight_scale.data.bfloat16()
    x = torch.randn(2, 128).bfloat16()
    assert torch.equal(method.apply(layer, x), int8_kernel()(x, layer.weight, layer.weight_scale))
    assert method.scratch.buffer is None
    assert not int8_kernel().takes(x.t(), layer.weight, layer.weight_scale)  # strided: another path
    compiled = torch.compile(lambda a: int8_gemm_op(a, layer.weight, layer.weight_scale), fullgraph=True)
    assert torch.equal(compiled(x), method.apply(layer, x))  # an operator in a graph, no break


@needs_bf16_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (7, 5), (130, 577), (33, 64), (49, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_bf16_kernel_is_the_exact_product_rounded_once(n, k, m):
    """Each output is the float64 product of the bfloat16 operands, up to float32 summation (K * 2^-24 of
    the sum of |products|), rounded once to bfloat16 (half an ulp: 2^-9 relative); and as close to oneDNN's
    bfloat16 matmul as the two roundings allow."""
    g = torch.Generator().manual_seed(n * k + m)
    x = (torch.randn(m, k, generator=g) * 3).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    got = bf16_kernel()(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact = x.double() @ w.double().T
    summed = x.double().abs() @ w.double().abs().T
    err = (got.double() - exact).abs()
    assert (err <= exact.abs() * 2.0**-8 + summed * k * 2.0**-24 + 1e-30).all()
    assert (
        (got.double() - torch.nn.functional.linear(x, w).double())
        .abs()
        .le(exact.abs() * 2.0**-7 + summed * 1e-5)
        .all()
    )


@needs_bf16_kernel
@pytest.mark.parametrize("n,k", [(576, 576), (7, 100), (131, 1536)])
def test_bf16_kernel_rows_are_the_same_bits_in_any_batch(n, k):
    """A row's result is the same bits alone and among up to 16 rows (every remainder of the 4 x 4 blocks,
    a tail of output rows), so a token decoded alone and recomputed in a batch gets the same logits."""
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(16, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    alone = torch.cat([bf16_kernel()(x[i : i + 1], w) for i in range(16)])
    for m in range(2, 17):
        assert torch.equal(bf16_kernel()(x[:m], w), alone[:m])


@needs_bf16_kernel
def test_unquantized_method_takes_the_bf16_kernel_for_decode_sized_calls(monkeypatch):
    """Up to BF16_KERNEL_ROWS bfloat16 rows on CPU go to the kernel (also inside torch.compile, as an
    operator); more rows, float32, or strided rows keep F.linear."""
    method, layer = UnquantizedMethod(), torch.nn.Module()
    with default_dtype(torch.bfloat16):
        method.create_weights(layer, 96, 128)
    layer.weight.data.copy_(torch.randn(96, 128))
    rows = cpu_kernels.BF16_KERNEL_ROWS
    for m in (1, rows):
        x = torch.randn(m, 128).bfloat16()
        assert bf16_kernel().takes(x, layer.weight)
        assert torch.equal(method.apply(layer, x), bf16_kernel()(x, layer.weight))
    assert not bf16_kernel().takes(torch.randn(1, 128), layer.weight)
    assert not bf16_kernel().takes(torch.randn(128, 2).bfloat16().t(), layer.weight)
    calls = []
    monkeypatch.setattr(cpu_kernels.Bf16Kernel, "__call__", lambda self, a, b: calls.append(a.shape))
    many = torch.randn(rows + 1, 128).bfloat16()
    assert torch.equal(method.apply(layer, many), torch.nn.functional.linear(many, layer.weight))
    assert calls == []
    monkeypatch.undo()
    x = torch.randn(1, 128).bfloat16()
    compiled = torch.compile(lambda a: bf16_gemm_op(a, layer.weight), fullgraph=True)
    assert torch.equal(compiled(x), method.apply(layer, x))


def test_int8_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FITLLM_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_loaded", [])
    monkeypatch.setattr(cpu_kernels, "_kernel", [])
    monkeypatch.setattr(cpu_kernels, "_kernel4", [])
    monkeypatch.setattr(cpu_kernels, "_kernel16", [])
    assert cpu_kernels.int8_kernel() is None and cpu_kernels.int4_kernel() is None
    assert cpu_kernels.bf16_kernel() is None
    one = torch.randn(1, 64).bfloat16()
    w16 = torch.randn(32, 64).bfloat16()
    unq = torch.nn.Module()
    unq.weight = torch.nn.Parameter(w16, requires_grad=False)
    assert torch.equal(UnquantizedMethod().apply(unq, one), torch.nn.functional.linear(one, w16))
    method, layer = Int8Method(), torch.nn.Module()
    method.create_weights(layer, 64, 64)
    method.load_rows(layer, 0, torch.randn(64, 64))
    x = torch.randn(1, 64)
    assert torch.equal(
        method.apply(layer, x), torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale)
    )


def _int4_layer(n: int, k: int, group: int, seed: int):
    """An int4 layer in PyTorch's CPU layout and its float32 weight as (q - 8) * scale + zero, unrounded."""
    method, layer = Int4Method(group), torch.nn.Module()
    with default_dtype(torch.bfloat16):
        method.create_weights(layer, n, k)
    method.load_rows(layer, 0, torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    plain = dequantize_int4(unpack_plain(layer.weight.data), layer.weight_scale_zeros.data, group)
    method.finish_loading(layer)
    assert layer.int4_kernel_layout
    return method, layer, plain.double()


@needs_int4_kernel
@pytest.mark.parametrize("n,k,group", [(576, 576, 32), (128, 1536, 32), (192, 256, 64), (64, 512, 256)])
@pytest.mark.parametrize("m", [1, 3])
def test_int4_kernel_matches_the_float_weight_and_pytorchs_kernel(n, k, group, m):
    method, layer, w = _int4_layer(n, k, group, seed=n + k + group)
    g = torch.Generator().manual_seed(m)
    x32 = torch.randn(m, k, generator=g) * 3
    x32[0, 5] = 40.0  # an outlier feature
    got32 = int4_kernel()(x32, layer.weight, layer.weight_scale_zeros, group)
    want = x32.double() @ w.T
    # float32 activations: only the two-part activation and float32 sums stand between it and the exact
    # product; the bound is that of the int8 kernel (each element within max|x_row| / 64516).
    bound = x32.double().abs().amax(1, keepdim=True) / 64516 * w.abs().sum(1)
    err = (got32.double() - want).abs()
    assert (err <= bound + 1e-4 * want.abs() + 1e-4).all()
    assert err.max() > 1e-6  # the activations were quantized
    x = x32.bfloat16()
    got = int4_kernel()(x, layer.weight, layer.weight_scale_zeros, group)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.weight, group, layer.weight_scale_zeros)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape == (m, n)
    exact = x.double() @ w.T
    assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + bound + 1e-3).all()
    assert ((got.double() - ref.double()).abs() <= 2**-7 * exact.abs() + 2 * bound + 1e-2).all()
    assert torch.equal(method.apply(layer, x), got)  # decode-sized calls take it


@needs_int4_kernel
def test_int4_kernel_paths_and_what_it_refuses():
    cpu = torch.device("cpu")
    assert int4_path(cpu, True, torch.bfloat16, rows=1, vnni=True) == "vnni"
    assert int4_path(cpu, True, torch.bfloat16, rows=1, vnni=False) == "aten"
    assert int4_path(cpu, True, torch.bfloat16, rows=48, out_features=128, vnni=True) == "scratch"
    kernel = int4_kernel()
    _, layer, _ = _int4_layer(
        80, 128, 32, seed=3
    )  # 64 + 16 rows: the kernel's tail block is laid out otherwise
    x = torch.randn(1, 128).bfloat16()
    assert not kernel.takes(x, layer.weight, layer.weight_scale_zeros, 32)
    with pytest.raises(ValueError, match="shape not taken"):
        kernel(x, layer.weight, layer.weight_scale_zeros, 32)
    _, layer, _ = _int4_layer(64, 128, 32, seed=4)
    compiled = torch.compile(
        lambda a: int4_gemm_op(a, layer.weight, layer.weight_scale_zeros, 32), fullgraph=True
    )
    assert torch.equal(compiled(x), kernel(x, layer.weight, layer.weight_scale_zeros, 32))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_dequantize_into_the_scratch_rounds_once(dtype):
    """Prefill-sized calls multiply through a scratch holding the dequantized weight: each element is
    q * scale computed in float32 and rounded once to the scratch's dtype, exactly."""
    q, scale = quantize_int8(torch.randn(37, 200, generator=torch.Generator().manual_seed(9)))  # K tail of 8
    scale = scale.to(dtype)
    out = torch.empty(37, 200, dtype=dtype)
    int8_kernel().dequantize_into(q, scale, out)
    assert torch.equal(out, (q.float() * scale.float()[:, None]).to(dtype))
    method, layer = Int8Method(), torch.nn.Module()
    method.create_weights(layer, 96, 128)
    method.load_rows(layer, 0, torch.randn(96, 128))
    layer.weight_scale.data = layer.weight_scale.data.to(dtype)
    x = torch.randn(kernel_rows(96 * 128), 128).to(dtype)  # the scratch path
    deq = (layer.weight.float() * layer.weight_scale.float()[:, None]).to(dtype)
    assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x, deq))


@needs_int4_kernel
@pytest.mark.parametrize("n,k,group", [(576, 576, 32), (192, 1536, 64), (64, 256, 128)])
def test_int4_unpack_equals_the_torch_unpacking(n, k, group):
    """Prefill-sized int4 calls unpack W^T into the scratch: the kernel's one pass writes exactly the bytes
    of int4.unpack_kernel_layout (itself pinned against the float dequantization in test_quant_layers)."""
    from fitllm.quant.int4 import unpack_kernel_layout

    _, layer, plain = _int4_layer(n, k, group, seed=n + group)
    want = torch.empty(k, n, dtype=torch.bfloat16)
    unpack_kernel_layout(layer.weight, layer.weight_scale_zeros, group, want)
    got = int4_kernel().unpack_into(layer.weight, layer.weight_scale_zeros, group, torch.empty_like(want))
    assert torch.equal(got, want)
    assert torch.equal(got.t().float(), plain.float().to(torch.bfloat16).float())


@needs_int4_kernel
@pytest.mark.parametrize("n,k,group", [(576, 576, 32), (200, 1536, 64), (8, 256, 128)])
def test_a_float32_models_int4_layer_dequantizes_in_one_pass_exactly(n, k, group):
    """A float32 model's int4 layers stay in the plain layout (their scales float32, a GGUF's fp16 ones held
    exactly) and are dequantized every call: the C pass equals dequantize_int4 bit for bit, and the layer's
    product is F.linear over that weight."""
    method = Int4Method(group)
    layer = torch.nn.Module()
    with default_dtype(torch.float32):
        method.create_weights(layer, n, k)
    method.load_rows(layer, 0, torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)))
    method.finish_loading(layer)
    assert not layer.int4_kernel_layout and layer.weight_scale_zeros.dtype == torch.float32
    want = dequantize_int4(unpack_plain(layer.weight.data), layer.weight_scale_zeros.data, group)
    got = int4_kernel().dequantize_plain(layer.weight.data, layer.weight_scale_zeros.data, group)
    assert torch.equal(got, want)
    assert torch.equal(method.dequantize(layer), want)
    x = torch.randn(3, k)
    assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x, want))
    # A group the pass does not take (not a multiple of 32) falls back to PyTorch's passes.
    assert int4_kernel().dequantize_plain(layer.weight.data, layer.weight_scale_zeros.data, 16) is None


@needs_kernel
def test_kernels_build_into_the_cache_once_and_fall_back_without_a_compiler(tmp_path, monkeypatch):
    """A fresh cache gets one shared object (named by the source's hash, no temporary left behind), the next
    load reuses it; a compiler that cannot run leaves PyTorch's kernels serving, not an error."""
    monkeypatch.setenv("FITLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_loaded", [])
    monkeypatch.setattr(cpu_kernels, "_kernel", [])
    monkeypatch.setattr(cpu_kernels, "_kernel4", [])
    kernel = cpu_kernels.int8_kernel()
    built = sorted((tmp_path / "kernels").iterdir())
    assert kernel is not None and len(built) == 1 and built[0].name.startswith("fitllm_kernels-")
    assert built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_loaded", [])
    assert cpu_kernels.load_library() is not None
    assert sorted((tmp_path / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels, "_loaded", [])
    monkeypatch.setattr(cpu_kernels, "_kernel", [])
    assert cpu_kernels.int8_kernel() is None


def test_a_changed_shared_header_rebuilds(tmp_path, monkeypatch):
    """The build key covers the headers beside the sources (simd.h), not only the sources."""
    import shutil

    monkeypatch.setenv("FITLLM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    shutil.copytree(cpu_kernels.KERNELS, src)
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler here")
    srcs = sorted(src.glob("*.c"))
    first = cpu_kernels._build(srcs, compiler)
    assert cpu_kernels._build(srcs, compiler) == first
    (src / "simd.h").write_text((src / "simd.h").read_text() + "\n/* changed */\n")
    assert cpu_kernels._build(srcs, compiler) != first
