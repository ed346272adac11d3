"""`fitllm eval perplexity`: the sliding-window method against transformers on the same weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.scorer import SequenceScorer
from fitllm.eval.perplexity import gutenberg_body, perplexity


def hf_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, summing token NLLs exactly."""
    input_ids = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        with torch.no_grad():
            logits = model(window).logits[0].float()
        logprobs = logits[:-1].log_softmax(-1).gather(1, window[0, 1:, None])[:, 0]
        scored = logprobs[-min(trg_len, len(logprobs)) :]
        nll -= float(scored.double().sum())
        count += len(scored)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ppl"), family="llama")


@pytest.mark.parametrize("context,stride", [(64, 64), (64, 24), (100, 37)])
def test_perplexity_equals_transformers(tiny, context, stride):
    from conftest import load_hf

    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=128, profile_workspace=False))
    gen = torch.Generator().manual_seed(context + stride)
    ids = torch.randint(3, 250, (301,), generator=gen).tolist()
    ours = perplexity(SequenceScorer(eng.model, eng.model_config, eng.device, context), ids, stride)
    ref, count = hf_perplexity(load_hf(tiny), ids, context, stride)
    assert ours.num_scored == count
    if stride < context:  # overlapping windows score every token after the first, exactly once
        assert count == len(ids) - 1
    assert ours.perplexity == pytest.approx(ref, rel=1e-4)


def test_scorer_restores_the_engines_kv_binding(tiny):
    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=128, profile_workspace=False))
    before = [attn.kv_slabs for attn in eng.model.attention_layers()]
    SequenceScorer(eng.model, eng.model_config, eng.device, 32).token_logprobs(list(range(3, 30)))
    assert [attn.kv_slabs for attn in eng.model.attention_layers()] == before
    # And the engine still generates after scoring.
    from fitllm.engine.request import SamplingParams

    out = list(eng.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))[-1]
    assert len(out.outputs[0].token_ids) == 4


def test_bad_stride_names_the_flag(tiny):
    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=128, profile_workspace=False))
    scorer = SequenceScorer(eng.model, eng.model_config, eng.device, 16)
    with pytest.raises(ValueError, match="--stride"):
        perplexity(scorer, list(range(3, 40)), 17)


def test_gutenberg_body_drops_header_and_license():
    text = "Title: X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nChapter 1.\nIt began.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense text"
    assert gutenberg_body(text) == "Chapter 1.\nIt began."
    assert gutenberg_body("plain text\n") == "plain text"


def test_cli_eval_perplexity_scores_with_the_engines_kv_format(tiny, tmp_path):
    """`fitllm eval perplexity` end to end: its JSON, its figure equal to the library's on the same tokens,
    and the KV cache dtype reaching the scorer (int8 K/V must move the figure, a little)."""
    from fitllm.cli import main as cli_main

    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(7)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(3, 250, (200,), generator=gen).tolist()))
    results = {}
    for kv in ("auto", "int8"):
        out = tmp_path / f"{kv}.json"
        argv = ["eval", "perplexity", "--model", str(tiny), "--text", str(text), "--dtype", "float32"]
        argv += ["--context", "64", "--stride", "32", "--kv-cache-dtype", kv, "--json", str(out)]
        assert cli_main(argv) == 0
        results[kv] = json.loads(out.read_text())
    keys = {"perplexity", "nll_sum", "num_scored", "num_tokens", "num_windows", "context", "stride"}
    keys |= {"model", "dtype", "quantization", "quant_group_size", "kv_cache_dtype", "weight_bytes"}
    keys |= {"load_rss_peak_growth", "load_rss_growth", "lm_head_dtype"}
    for kv, r in results.items():
        assert set(r) == keys, kv
        assert r["kv_cache_dtype"] == kv and r["quantization"] == "none" and r["dtype"] == "torch.float32"
        assert r["lm_head_dtype"] == "model dtype"  # unquantized weights: the head stays in the model dtype
        assert (r["num_tokens"], r["num_scored"], r["context"], r["stride"]) == (200, 199, 64, 32)
        assert r["num_windows"] == 6 and r["weight_bytes"] > 0

    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=64, profile_workspace=False))
    ids = eng.tokenizer.encode(text.read_text())
    ref = perplexity(SequenceScorer(eng.model, eng.model_config, eng.device, 64, eng.kv_format), ids, 32)
    assert results["auto"]["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert results["auto"]["nll_sum"] == pytest.approx(ref.nll_sum, rel=1e-6)
    # int8 K/V: a small, nonzero change (if the CLI dropped the KV format it would be exactly auto's).
    # Measured: +0.25% on this model and text.
    change = abs(results["int8"]["perplexity"] / results["auto"]["perplexity"] - 1)
    assert 0 < change < 0.02, change
