"""Prequantized GGUF blocks (fitllm/quant/gguf_blocks.py): parsing against the `gguf` package's own
dequantizer, and loading Q8_0 into int8 and Q4_0/Q4_1 into int4 group 32 without a float copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fitllm.loader import build_model, open_model
from fitllm.model.linear import ColumnParallelLinear
from fitllm.quant import get_quant_method
from fitllm.quant.gguf_blocks import read_blocks
from fitllm.quant.int8 import quantize_int8


def _quantized(qtype: str, shape=(48, 96), seed=0):
    """(raw GGUF bytes of a random tensor quantized by the gguf package, its float32 dequantization)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * np.linspace(0.01, 3, shape[0])[:, None]).astype(np.float32)
    w[:, :32] += 0.5  # an off-centre block: Q4_1's min matters
    kind = GGMLQuantizationType[qtype]
    raw = quantize(w, kind)
    return raw, torch.from_numpy(np.asarray(dequantize(raw, kind), dtype=np.float32).reshape(shape))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_dequantize_like_the_gguf_package(qtype):
    raw, reference = _quantized(qtype)
    blocks = read_blocks(raw, qtype, (48, 96))
    assert blocks.shape == (48, 96) and blocks.scales.shape == (48, 3)
    assert torch.equal(blocks.dequantize(), reference)
    # Row and block-aligned column shards are the same numbers as the matching slice.
    assert torch.equal(blocks.narrow(0, 8, 16).dequantize(), reference[8:24])
    assert torch.equal(blocks.narrow(1, 32, 64).dequantize(), reference[:, 32:])
    with pytest.raises(ValueError, match="32-column blocks"):
        blocks.narrow(1, 16, 32)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(blocks.index_rows(perm).dequantize(), reference[perm])


def _layer(method: str, group: int | None = None) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(96, 48, quant=get_quant_method(method, group))
    layer.to_empty(device="cpu")
    if method == "int4":
        layer.weight_scale_zeros.data = layer.weight_scale_zeros.data.float()
    else:
        layer.weight_scale.data = layer.weight_scale.data.float()
    return layer


def test_q8_0_loads_into_int8_as_the_float_round_trip_would():
    raw, reference = _quantized("Q8_0")
    direct = _layer("int8")
    direct._load_rows(0, 48, read_blocks(raw, "Q8_0", (48, 96)))
    q, scale = quantize_int8(reference)
    assert torch.equal(direct.weight_scale.data, scale)
    # Same codes as quantizing the dequantized tensor, up to float rounding of exact halves.
    assert (direct.weight.data.int() - q.int()).abs().max() <= 1
    assert (direct.weight.data != q).float().mean() < 0.01


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4bit_blocks_load_into_int4_group_32_exactly(qtype):
    raw, reference = _quantized(qtype)
    layer = _layer("int4", 32)
    assert qtype in layer.quant.block_types()
    layer._load_rows(0, 48, read_blocks(raw, qtype, (48, 96)))
    layer.quant.finish_loading(layer)  # float32 scales: the plain layout stays
    torch.testing.assert_close(layer.quant.dequantize(layer), reference, rtol=0, atol=1e-6)
    # At group 64 the codes cannot be kept: the tensor is dequantized and requantized instead.
    assert get_quant_method("int4", 64).block_types() == ()


@pytest.fixture(scope="module")
def default_source():
    return open_model(None)


def test_default_model_linears_are_q4_1_blocks_and_load_without_requantizing(default_source):
    assert default_source.linear_block_type() == "Q4_1"
    blocks = dict(default_source.weights(as_blocks=True))
    floats = dict(open_model(None).weights())
    name = "model.layers.3.self_attn.q_proj.weight"  # llama.cpp-permuted rows: the blocks are unpermuted too
    assert torch.equal(blocks[name].dequantize(), floats[name])
    embedding = blocks["model.embed_tokens.weight"]  # Q8_0: dequantized into the table by row chunks
    assert embedding.qtype == "Q8_0" and torch.equal(
        embedding.dequantize(), floats["model.embed_tokens.weight"]
    )

    int4 = build_model(
        open_model(None), torch.bfloat16, torch.device("cpu"), 256, quant=get_quant_method("int4", 32)
    )
    qkv = int4.layers[3].self_attn.qkv_proj
    got = qkv.quant.dequantize(qkv)[: floats[name].shape[0]]
    # Only the bfloat16 rounding of each block's scale and zero separates it from the checkpoint's values.
    assert (got - floats[name]).abs().max() <= 0.01 * floats[name].abs().max()
