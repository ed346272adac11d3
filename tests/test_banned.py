"""Banned strings (anti-slop) with backtracking.

The reference is KoboldCpp's algorithm written out naively over transformers' model (no KV cache, the whole
sequence recomputed every token): greedy decoding; when the output's text contains a banned phrase
(case-insensitive), the shortest run of last tokens whose text contains it is removed and its first token is
forbidden at that position. The engine must produce the same tokens with its K/V, batching, async
scheduling and preemption, and give back the blocks it rewinds.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import load_hf, make_random_checkpoint, run_streamed, tight_engine

from fitllm import SamplingParams
from fitllm.config import EngineConfig
from fitllm.engine.banned import BannedStrings, apply_bans, single_char_bans
from fitllm.engine.detokenizer import IncrementalDetokenizer
from fitllm.engine.engine import Engine
from fitllm.engine.request import Request

# ---- the detokenizer: where a phrase began, on the default model's tokenizer ------------------------------


@pytest.fixture(scope="module")
def tok():
    from fitllm.loader import open_model

    return open_model(None).tokenizer()


TEXT = " The quick brown fox jumps over the lazy dog. Then it ran into the forest."


def feed(tok, text: str, phrases: list[str], prompt: str = "Story:"):
    """Feed text's tokens one at a time until a banned phrase completes; returns (banned_at, the token index
    that completed it, every delta streamed before, the detokenizer)."""
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode(prompt), [], True, False, BannedStrings(phrases))
    streamed = ""
    for i, t in enumerate(ids):
        det.add_token(t)
        if det.banned_at is not None:
            return det.banned_at, i, streamed, det
        streamed += det.take_delta(False)
    return None, None, streamed, det


def first_token_at(tok, text: str, char: int) -> int:
    """The index of the token of `text` whose span holds character `char` (the tokenizer's own offsets)."""
    offsets = tok.backend.encode(text, add_special_tokens=False).offsets
    return next(i for i, (a, b) in enumerate(offsets) if a <= char < b)


def test_phrase_spanning_three_tokens_rewinds_to_its_first(tok):
    phrase = "ick brown fox ju"  # ends inside " jumps": " quick" / " brown" / " fox" / " jumps"
    at, completed, streamed, det = feed(tok, TEXT, [phrase])
    start = TEXT.index(phrase)
    assert at == first_token_at(tok, TEXT, start) == 1  # " quick"
    assert completed == first_token_at(tok, TEXT, start + len(phrase) - 1) == at + 3
    assert phrase not in streamed and streamed == TEXT[: len(streamed)]
    # Only whole tokens before the phrase were released, so the rewind takes back nothing streamed.
    assert len(streamed) <= TEXT.index(" quick")
    det.rewind(at)
    assert det.text == TEXT[: TEXT.index(" quick")]


def test_phrase_in_the_prompt_does_not_trigger(tok):
    at, _, streamed, det = feed(tok, TEXT, ["Story"], prompt="Story: a story")
    assert at is None and streamed + det.take_delta(True) == TEXT


@pytest.mark.parametrize("phrase", ["LAZY DOG", "Lazy Dog", "lAzY dOg"])
def test_case_insensitive(tok, phrase):
    at, _, _, _ = feed(tok, TEXT, [phrase])
    assert at == first_token_at(tok, TEXT, TEXT.index("lazy"))


def test_overlapping_phrases_the_earliest_start_wins(tok):
    # "the lazy" is complete first and starts before "lazy dog": its start is where the rewind goes.
    at, completed, _, _ = feed(tok, TEXT, ["lazy dog", "the lazy"])
    assert at == first_token_at(tok, TEXT, TEXT.index("the lazy"))
    assert completed == first_token_at(tok, TEXT, TEXT.index("lazy"))
    # Both complete with the same token: the one that starts first is taken.
    at, _, _, _ = feed(tok, TEXT, ["zy dog", "lazy do"])
    assert at == first_token_at(tok, TEXT, TEXT.index("lazy"))


def test_rewind_then_continue_decodes_as_if_never_written(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    at, _, streamed, det = feed(tok, TEXT, ["brown fox"])
    det.rewind(at)
    other = tok.encode(" slow red cat", add_special_tokens=False)
    for t in other:
        det.add_token(t)
    assert det.text == tok.decode(ids[:at] + other)
    assert streamed + det.take_delta(True) == det.text


# ---- the sampler: forbidden tokens on fixed logits ----------------------------------------------------------


def test_bans_apply_at_the_position_being_sampled_only():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    reqs = [Request(f"r{i}", None, [9, 9], SamplingParams(temperature=0)) for i in range(3)]
    reqs[0].banned = BannedStrings(["x"], bans={2: {0}, 3: {1}})  # samples position 2: token 0 forbidden
    reqs[1].banned = BannedStrings(["x"], bans={2: {0}, 3: {0, 1}})
    reqs[1].num_output_placeholders = 1  # a token in flight: it samples position 3
    # reqs[2] bans nothing
    apply_bans(logits, reqs)
    assert logits.argmax(dim=-1).tolist() == [1, 2, 3]
    assert logits[0].tolist() == [float("-inf"), 4.0, 3.0, 0.0]
    assert logits[2].tolist() == [1.0, 2.0, 3.0, 4.0]


# ---- end to end against the naive reference, on a small random model ---------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("banned"), "llama", seed=11)


@pytest.fixture(scope="module")
def hf(tiny):
    return load_hf(tiny)


@torch.inference_mode()
def reference(hf, tokenizer, prompt: list[int], phrases: list[str], n: int) -> tuple[list[int], int]:
    """KoboldCpp's anti-slop over full recomputes; returns (output tokens, rewinds)."""
    out: list[int] = []
    bans: dict[int, set[int]] = {}
    lowered = [p.lower() for p in phrases]
    rewinds = 0
    while len(out) < n:
        logits = hf(torch.tensor([prompt + out]), use_cache=False).logits[0, -1].float()
        for t in bans.get(len(out), ()):
            logits[t] = float("-inf")
        out.append(int(logits.argmax()))
        text = tokenizer.decode(out).lower()
        if any(p in text for p in lowered):
            k = len(out) - 1  # the shortest tail of tokens whose text holds a phrase
            while not any(p in tokenizer.decode(out[k:]).lower() for p in lowered):
                k -= 1
            bans.setdefault(k, set()).add(out[k])
            del out[k:]
            rewinds += 1
    return out, rewinds


def make_engine(folder, **kw) -> Engine:
    cfg = dict(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def workload(engine: Engine, hf, n_tokens: int = 24):
    """Eight prompts; the third bans a three-token phrase (upper-cased) that it would write, and one that
    is in its prompt."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(5, 40))] for _ in range(8)]
    tok = engine.tokenizer
    free = [reference(hf, tok, p, [], n_tokens)[0] for p in prompts]
    assert len(set(free[2])) > 4, "the reference must write varied text for the test to mean anything"
    pieces = tok.decode(free[2][4:7])  # e.g. "t17 t3 t200": cut a character off each end
    phrase = pieces[1:-1].upper()
    in_prompt = tok.decode(prompts[2][1:3])
    assert in_prompt.lower() not in tok.decode(free[2]).lower()
    params = [SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True) for _ in prompts]
    params[2].banned_strings = [phrase, in_prompt]
    want = list(free)
    want[2], rewinds = reference(hf, tok, prompts[2], [phrase, in_prompt], n_tokens)
    assert rewinds > 0
    return prompts, params, want, phrase


@pytest.mark.parametrize(
    "kw",
    [
        dict(async_scheduling="off"),
        dict(async_scheduling="on"),
        dict(async_scheduling="on", max_num_batched_tokens=32, block_size=4),
    ],
    ids=["sync", "async", "async-chunked-small-blocks"],
)
def test_engine_equals_reference_and_only_the_banned_request_rewinds(tiny, hf, kw):
    engine = make_engine(tiny, **kw)
    prompts, params, want, phrase = workload(engine, hf)
    rewound = []
    orig = engine.scheduler.rewind
    engine.scheduler.rewind = lambda req, n: (rewound.append(req.request_id), orig(req, n))[1]
    outs, deltas = run_streamed(engine, prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert set(rewound) == {outs[2].request_id}
    text = outs[2].outputs[0].text
    assert phrase.lower() not in text.lower() and deltas[2] == text


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_rewinds_under_preemption(tiny, hf, mode):
    engine = tight_engine(tiny, 10, swap_space=64 << 20, preemption_mode=mode, async_scheduling="on")
    prompts, params, want, _ = workload(engine, hf, n_tokens=30)
    outs, _ = run_streamed(engine, prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert engine.scheduler.num_preemptions > 0


def test_a_phrase_completed_by_the_last_token_is_rewound_too(tiny, hf):
    """max_tokens ends the request with the token that completes the phrase: it is taken back and goes on."""
    engine = make_engine(tiny, async_scheduling="on")
    tok = engine.tokenizer
    prompt = [5, 6, 7, 8]
    free, _ = reference(hf, tok, prompt, [], 10)
    phrase = tok.decode(free[8:10])
    want, rewinds = reference(hf, tok, prompt, [phrase], 10)
    assert rewinds > 0
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, banned_strings=[phrase], logprobs=1)
    (out,), _ = run_streamed(engine, [prompt], [sp])
    c = out.outputs[0]
    assert c.token_ids == want and c.finish_reason == "length" and len(c.logprobs) == 10
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))


def test_one_character_entries_forbid_every_token_holding_them(tiny):
    """KoboldCpp: an entry of one character that is one token bans, at every position, each token whose text
    contains it (case-insensitive), so the phrase check never has to rewind for it."""
    assert single_char_bans(["E", "ab", "x"], lambda p: [1] * len(p), ["the", "cat", "ex", "ab"]) == {0, 2}
    engine = make_engine(tiny)
    prompt = [5, 6, 7, 8]
    free = run_streamed(engine, [prompt], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)])[0][
        0
    ]
    assert "7" in free.outputs[0].text
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, banned_strings=["7"])
    rid = engine.add_request(prompt, sp)
    req = engine.requests[rid]
    assert req.banned.always == {i for i in range(256) if "7" in f"t{i}"}
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
    assert "7" not in text and req.banned.num_rewinds == 0
