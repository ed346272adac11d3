"""The quantized LM head (`--lm-head-dtype`): the int8 head's matmul paths and tied-embedding lookup against
the dequantized weight, the engine's logits against the model-dtype head, planned bytes against the ledger
and the parameters, and the flag's choices. The default model's greedy continuations: test_quant.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_random_checkpoint, run_engine

from fitllm import Engine, EngineConfig
from fitllm.config import ModelConfig
from fitllm.model.layers import VocabEmbedding, vocab_layers
from fitllm.plan.weights import weight_breakdown
from fitllm.quant import get_quant_method, head_method, int8
from fitllm.quant.int8 import Int8Method


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _int8_table(
    vocab: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> tuple[VocabEmbedding, torch.Tensor]:
    """A tied table under the int8 head method, loaded from random float rows; and those rows."""
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
    with torch.device("cpu"):
        table = VocabEmbedding(vocab, hidden, Int8Method(chunked=True))
    table.weight_scale.data = table.weight_scale.data.to(dtype)
    table.weight_loader(table.weight, w)
    return table, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_table_lookup_is_the_rows_the_head_multiplies(dtype):
    table, w = _int8_table(300, 64, dtype)
    deq = table.quant.dequantize(table)
    assert 0 < _rel(deq, w) < 0.01  # per-row int8 of Gaussian rows: measured 0.0060
    ids = torch.tensor([0, 5, 299, 5])
    got = table(ids)
    assert got.dtype == dtype
    assert torch.equal(got, deq[ids].to(dtype))  # rounded once, from the same codes and scales


@pytest.mark.parametrize("rows", [1, 3, 40])  # the aten kernel below kernel_rows, the scratch at and above
def test_int8_head_paths_equal_the_dequantized_matmul(rows, monkeypatch):
    """Float32: every path is x @ deq^T up to summation order; the scratch path in several slices (the
    head's bounded scratch) equals the whole-weight product."""
    table, _ = _int8_table(1000, 64, torch.float32, seed=1)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(2))
    want = F.linear(x, table.quant.dequantize(table))
    monkeypatch.setattr(
        int8, "SCRATCH_CHUNK_ELEMENTS", 64 * 300
    )  # 300 rows a slice: 4 slices, the last short
    assert table.quant.scratch_elements(table) == 64 * 300
    assert torch.allclose(table.project(x), want, atol=1e-4, rtol=1e-4)
    scratch = table.quant.scratch.buffer
    assert (scratch is None) == (rows < int8.kernel_rows(table.weight.numel()))
    assert scratch is None or scratch.numel() == 64 * 300  # the slice, never the whole table
    monkeypatch.undo()
    assert torch.allclose(table.project(x), want, atol=1e-4, rtol=1e-4)


def test_head_method_follows_the_flag():
    assert head_method("int4", "auto", get_quant_method("int4")) is not None
    assert head_method(None, "auto", get_quant_method(None)) is None
    assert head_method("none", "auto", get_quant_method(None)) is None
    assert head_method("int4", "model", get_quant_method("int4")) is None
    assert isinstance(head_method(None, "int8", get_quant_method(None)), Int8Method)
    int8_decoder = get_quant_method("int8")
    assert int8_decoder.head.scratch is int8_decoder.scratch  # one scratch, counted once by the planner
    with pytest.raises(ValueError, match="--lm-head-dtype must be one of auto, model, int8; got 'int4'"):
        get_quant_method("int4", lm_head_dtype="int4")


def test_bad_lm_head_dtype_refused_naming_the_flag(capsys):
    with pytest.raises(ValueError, match="--lm-head-dtype must be one of auto, model, int8; got 'fp8'"):
        EngineConfig(lm_head_dtype="fp8")
    from fitllm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", "--lm-head-dtype", "fp8"])
    assert exc.value.code == 2
    assert "--lm-head-dtype" in capsys.readouterr().err


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def head_folder(request, tmp_path_factory):
    return make_random_checkpoint(
        tmp_path_factory.mktemp("head"),
        "llama",
        seed=5,
        initializer_range=0.1,
        tie_word_embeddings=request.param,
    )


def _engine(folder, quantization: str | None, lm_head_dtype: str, dtype: str = "float32") -> Engine:
    return Engine(
        EngineConfig(
            model=str(folder),
            dtype=dtype,
            device="cpu",
            quantization=quantization,
            lm_head_dtype=lm_head_dtype,
            max_model_len=128,
            max_num_seqs=4,
        )
    )


# Relative L2 error of every step's logits against the float32 head's, on the same tokens, measured (10
# steps): tied max 0.0197 (mean 0.014: the embedding's rows are the int8 ones too, and the error grows
# through the layers), untied max 0.0064 (mean 0.006). About 2x margin; a wrong scale or row is order 1.
HEAD_TOL = {True: 0.04, False: 0.013}


def test_int8_head_logits_close_to_the_model_dtype_head(head_folder):
    """The decoder unquantized, only the head (and a tied embedding) int8."""
    ref, eng = _engine(head_folder, None, "model"), _engine(head_folder, None, "int8")
    tied = ref.model_config.tie_word_embeddings
    held = eng.model.embed_tokens if tied else eng.model.lm_head
    assert held.weight.dtype == torch.int8 and held.quant.name == "int8"
    if not tied:
        assert eng.model.embed_tokens.weight.dtype == torch.float32  # untied: the embedding is not the head
    prompt = torch.randint(3, 256, (37,), generator=torch.Generator().manual_seed(7)).tolist()
    tokens, want = run_engine(ref, prompt, 10)
    assert len(set(tokens)) >= 4, tokens
    errors = []
    for i in range(len(tokens)):
        got = run_engine(eng, prompt + tokens[:i], 1)[1][0]
        errors.append(_rel(got, want[i]))
    assert 0 < max(errors) < HEAD_TOL[tied], errors


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_planned_head_bytes_equal_the_ledger(head_folder, quantization):
    """auto quantizes the head with the decoder; the planner's embedding and head bytes are the parameters'
    as loaded (int8 codes plus one model-dtype scale per vocabulary row), and the ledger holds the total."""
    eng = _engine(head_folder, quantization, "auto", dtype="bfloat16")
    mc: ModelConfig = eng.model_config
    planned = weight_breakdown(mc, eng.dtype, eng.quant)
    assert eng.ledger.current("weights") == planned.total
    int8_table = mc.vocab_size * mc.hidden_size + mc.vocab_size * 2
    bf16_table = mc.vocab_size * mc.hidden_size * 2
    held = {name: p.numel() * p.element_size() for name, p in eng.model.named_parameters()}
    if mc.tie_word_embeddings:
        assert (
            planned.embedding == int8_table == held["embed_tokens.weight"] + held["embed_tokens.weight_scale"]
        )
        assert planned.lm_head == 0
    else:
        assert planned.embedding == bf16_table == held["embed_tokens.weight"]
        assert planned.lm_head == int8_table == held["lm_head.weight"] + held["lm_head.weight_scale"]
    assert planned.lm_head_dtype == "int8"
    model_head = weight_breakdown(mc, eng.dtype, get_quant_method(quantization, lm_head_dtype="model"))
    assert model_head.total - planned.total == bf16_table - int8_table


def test_vocab_layers_build_the_head_the_method_names():
    cfg = ModelConfig("LlamaForCausalLM", "llama", 32, 1, 2, 2, 16, 64, 96, tie_word_embeddings=True)
    with torch.device("meta"):
        embed, head = vocab_layers(cfg, get_quant_method("int4", 32))
    assert head is None and embed.weight.dtype == torch.int8
    with torch.device("meta"):
        embed, head = vocab_layers(cfg, get_quant_method("int4", 32, lm_head_dtype="model"))
    assert head is None and embed.weight.is_floating_point()
