"""`fitllm eval perplexity`: the sliding-window method against transformers on the same weights."""

from __future__ import annotations

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
