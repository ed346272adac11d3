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


def test_q8_0_gguf_loads_into_int8_end_to_end(tmp_path, monkeypatch):
    """A Q8_0 GGUF (written with the `gguf` package) under --quantization int8: every decoder linear comes
    in through load_blocks (codes, no float copy), rescaled onto one scale per row as the float round trip
    would give; the ledger equals the planner, and the logits stay close to the dequantized float model."""
    from conftest import run_engine, write_random_gguf

    from fitllm import Engine, EngineConfig
    from fitllm.plan.weights import weight_breakdown
    from fitllm.quant.int8 import Int8Method

    path = tmp_path / "tiny-q8_0.gguf"
    write_random_gguf(path, "Q8_0", seed=3, initializer_range=0.1)
    calls = {"blocks": 0, "rows": 0}
    load_blocks, load_rows = Int8Method.load_blocks, Int8Method.load_rows

    def counting_blocks(self, layer, offset, blocks):
        assert blocks.qtype == "Q8_0"
        calls["blocks"] += 1
        return load_blocks(self, layer, offset, blocks)

    def counting_rows(self, layer, offset, rows):
        calls["rows"] += 1
        return load_rows(self, layer, offset, rows)

    monkeypatch.setattr(Int8Method, "load_blocks", counting_blocks)
    monkeypatch.setattr(Int8Method, "load_rows", counting_rows)

    def engine(
        method,
    ):  # the head in float: this test is about the decoder's Q8_0 codes (the head's: test_lm_head)
        cfg = EngineConfig(
            model=str(path), dtype="float32", quantization=method, lm_head_dtype="model", max_model_len=128
        )
        return Engine(cfg)

    assert open_model(str(path)).linear_block_type() == "Q8_0"
    ref, eng = engine(None), engine("int8")
    assert calls == {"blocks": 7 * 2, "rows": 0}  # 7 linears per layer, 2 layers: all taken as codes
    assert eng.ledger.current("weights") == weight_breakdown(eng.model_config, eng.dtype, eng.quant).total
    assert eng.ledger.current("weights") < ref.ledger.current("weights")
    for i, layer in enumerate(eng.model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            got, want = layer.get_submodule(name), ref.model.layers[i].get_submodule(name).weight.data
            q, scale = quantize_int8(want)  # the float round trip: quantize the dequantized tensor
            assert got.weight.dtype == torch.int8 and torch.equal(got.weight_scale.data, scale), name
            assert (got.weight.data.int() - q.int()).abs().max() <= 1, name
            assert (got.weight.data != q).float().mean() < 0.01, name
    # Last-position logits of three prompts; measured relative L2 error 0.011-0.016 (the per-row
    # requantization of Q8_0's per-block codes), 3x margin. A row with the wrong scale or codes is order 1.
    for n in (5, 17, 33):
        prompt = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        want, got = (run_engine(e, prompt, 1)[1][0] for e in (ref, eng))
        err = ((got - want).norm() / want.norm()).item()
        assert 0 < err < 0.05, (n, err)
