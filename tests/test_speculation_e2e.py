"""Prompt-lookup speculation on the real default model (SmolLM2-135M-Instruct, float32 on CPU): a code edit,
which the model answers by copying most of its prompt (so most proposals are accepted), beside book
prompts (few are): greedy output identical to plain decoding alone, batched, chunked and preempted, the
pool's integrity checked after every step and every rollback."""

from __future__ import annotations

import pytest
from test_engine import BLOCK_BYTES, BOOK, make_engine, run, tokens_of

from benchmarks.code_edit import edit_tasks

MAX_TOKENS = 32


def greedy(n: int = MAX_TOKENS):
    from fitllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_engine():
    return make_engine()


@pytest.fixture(scope="module")
def prompts(plain_engine):
    tok = plain_engine.tokenizer
    edits = [
        tok.encode(tok.apply_chat_template(t.messages()), add_special_tokens=False)
        for t in edit_tasks(1, seed=3)
    ]
    text = BOOK.read_text(encoding="utf-8")
    start = text.index("No one would have believed")
    book = tok.encode(text[start : start + 3000])
    return edits + [book[300:420]]


@pytest.fixture(scope="module")
def alone(plain_engine, prompts):
    return [tokens_of(run(plain_engine, [p], greedy()))[0] for p in prompts]


def spec_engine(**kw):
    eng = make_engine(speculative_ngram=3, speculative_tokens=5, **kw)
    drop = eng.scheduler._drop_computed

    def checked(req, num_tokens):
        drop(req, num_tokens)
        eng.check_integrity()

    eng.scheduler._drop_computed = checked
    return eng


def test_edit_alone_and_batched_match_plain(prompts, alone):
    eng = spec_engine()
    assert tokens_of(run(eng, [prompts[0]], greedy())) == [alone[0]]
    assert tokens_of(run(eng, prompts, greedy())) == alone
    stats = eng.speculator.stats
    assert stats.num_accepted_tokens >= 5  # the edit copies its prompt: verify steps accepted tokens


def test_chunked_and_preempted_match_plain(prompts, alone):
    chunked = spec_engine(max_num_batched_tokens=24)
    assert tokens_of(run(chunked, prompts, greedy())) == alone
    assert chunked.speculator.stats.num_accepted_tokens > 0
    # A pool of exactly the prompts' blocks (the edit prompt is this repository's source, so its length moves
    # with the code): both are admitted, and whichever needs a new block first, within 16 of its 32 tokens,
    # preempts the other, however fast speculation finishes the edit (with two spare blocks, an edit that
    # accepted most proposals finished before the book prompt needed its block).
    room = sum(-(-len(p) // 16) for p in prompts)
    tight = spec_engine(kv_cache_memory=room * BLOCK_BYTES)
    assert tokens_of(run(tight, prompts, greedy())) == alone
    assert tight.scheduler.num_preemptions > 0
