"""Prompt-lookup speculative decoding (fitllm/engine/speculation/): proposals, their exact verification,
and the engine with it on: the same greedy tokens (and the same seeded samples) as plain decoding, alone,
batched, chunked and preempted, with the pool's integrity checked after every rollback.

Random tiny models rarely repeat their prompt, so besides the n-gram proposer an oracle proposer (the
plain run's own continuation, corrupted at known places) drives the accepted, partly accepted and
rejected paths through the same verification."""

from __future__ import annotations

import pytest
import torch
from conftest import fixed_and_block_bytes, make_random_checkpoint, run_all

from fitllm import SamplingParams
from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import Request
from fitllm.engine.sampler import Sampler, apply_penalties
from fitllm.engine.speculation import (
    DraftRow,
    NgramIndex,
    Speculator,
    accepted_tokens,
    sampling_rows,
    speculation_refusal,
)

VOCAB = 256
MAX_TOKENS = 40


# ---- proposals ------------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_latest_match():
    index = NgramIndex(1, 3)
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    # "5 6 7" occurred at the start (followed by 8 9); "6 7" later too (followed by 2), but longer wins.
    assert index.propose(seq, 3) == [8, 9, 1]
    # Grown incrementally: "7 2" -> "3", the only earlier "7 2"... followed by 3 5 6.
    seq += [2]
    assert index.propose(seq, 4) == [3, 5, 6, 7]
    assert index.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    # The longest n-gram that occurs, however short, down to n_min.
    assert NgramIndex(2, 3).propose([4, 1, 9, 9, 4, 1], 2) == [9, 9]
    assert NgramIndex(2, 3).propose([4, 1, 9, 9, 4], 2) == []  # a 1-gram is below n_min


def test_ngram_index_rebuilds_after_a_cut():
    index = NgramIndex(1, 2)
    assert index.propose([1, 2, 3, 1], 2) == [2, 3]
    assert index.propose([1, 2], 2) == []  # cut: the old entries are gone
    assert index.propose([1, 2, 7, 1], 2) == [2, 7]


def test_accepted_tokens():
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted, plus the bonus row
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # first mismatch gives its own sample
    assert accepted_tokens([4, 5, 6], [1, 5, 6, 7]) == [1]
    assert accepted_tokens([], [3]) == [3]


def test_refused_samplers():
    assert speculation_refusal(SamplingParams()) is None
    assert speculation_refusal(SamplingParams(repetition_penalty=1.2, top_k=5, min_p=0.1)) is None
    assert speculation_refusal(SamplingParams(top_a=0.2, typical_p=0.9)) is None  # stateless chain
    for p in (
        SamplingParams(dry_multiplier=0.8),
        SamplingParams(mirostat=2),
        SamplingParams(xtc_probability=0.5),
        SamplingParams(banned_strings=["no"]),
    ):
        assert speculation_refusal(p) is not None


# ---- the sampling rows are plain decoding's --------------------------------------------------------------


def test_draft_row_samples_as_the_request_with_the_proposals_appended():
    """Penalties, min_tokens and bias at a proposed position equal those of a request that really has the
    proposals as output tokens (a Request built with them: the reference)."""
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, min_tokens=4, logit_bias={7: 2.0}
    )
    req = Request("r", None, [3, 4, 5], params)
    req.token_ids += [9, 10]  # two output tokens
    drafts = [9, 11, 2]
    rows = sampling_rows([req], [drafts])
    assert [type(r) for r in rows] == [Request, DraftRow, DraftRow, DraftRow]
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    got = logits.clone()
    apply_penalties(got, rows)
    from fitllm.engine.sampler import apply_bias_and_min_tokens

    apply_bias_and_min_tokens(got, rows, [2])
    for j in range(4):
        ref = Request("ref", None, [3, 4, 5], params)
        ref.token_ids += [9, 10] + drafts[:j]
        want = logits[j : j + 1].clone()
        apply_penalties(want, [ref])
        apply_bias_and_min_tokens(want, [ref], [2])
        assert torch.equal(got[j], want[0]), j
    # min_tokens 4: EOS (2) is forbidden while fewer than 4 output tokens precede the position.
    assert [bool(got[j, 2] == float("-inf")) for j in range(4)] == [True, True, False, False]


def _chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's chi-square test p-value (cells with expected count >= 5; the rest pooled)."""
    n = observed.sum()
    exp = expected_probs * n
    big = exp >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([exp[big], exp[~big].sum().view(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def _reference_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) cut to its top-p nucleus and renormalised, written out here (not the sampler's)."""
    p = (logits.double() / temperature).softmax(-1)
    order = p.argsort(descending=True)
    sorted_p = p[order]
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    out = torch.zeros_like(p)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


@pytest.mark.parametrize("draft_rank", [0, 3])  # a likely proposal, and an unlikely one
def test_verification_samples_the_plain_distribution(draft_rank):
    """Fixed logits for 3 rows, proposals [d1, d2], many seeded draws: the first token is distributed as
    row 0's tempered nucleus; given it was d1, the second as row 1's; given d1, d2, the third as row 2's
    (chi-square, each against the distribution computed directly)."""
    vocab, T, top_p = 12, 0.8, 0.9
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, vocab, generator=gen) * 1.5
    ref = [_reference_probs(logits[j], T, top_p) for j in range(3)]
    d1 = int(ref[0].argsort(descending=True)[draft_rank])
    d2 = int(ref[1].argsort(descending=True)[draft_rank])
    sampler = Sampler([], seed=0)
    counts = [torch.zeros(vocab, dtype=torch.float64) for _ in range(3)]
    n = 6000
    for seed in range(n):
        req = Request("r", None, [1, 2, 3], SamplingParams(temperature=T, top_p=top_p, seed=seed))
        rows = sampling_rows([req], [[d1, d2]])
        sampled = sampler(logits.clone(), rows).token_ids
        got = accepted_tokens([d1, d2], sampled)
        for j, t in enumerate(got):
            counts[j][t] += 1
    assert counts[0].sum() == n
    for j in range(3):
        if counts[j].sum() >= 200:
            p = _chi_square_p(counts[j], ref[j])
            assert p > 1e-3, f"position {j}: chi-square p = {p:.2g}"
    # How often each proposal was accepted is p(d), the rejection sampler's acceptance probability.
    accept1 = counts[1].sum() / n
    assert abs(accept1 - ref[0][d1]) < 4 * (ref[0][d1] * (1 - ref[0][d1]) / n) ** 0.5 + 1e-9


# ---- the engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("spec"))


def make_engine(folder, **kw) -> Engine:
    cfg = dict(model=str(folder), dtype="float32", max_model_len=256, profile_workspace=False)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, VOCAB, (20,), generator=gen).tolist()
    return [
        base * 3 + base[:5],  # repeats: the n-gram proposer finds matches
        (base[5:15] * 4)[:33],
        torch.randint(3, VOCAB, (40,), generator=gen).tolist(),
        torch.randint(3, VOCAB, (7,), generator=gen).tolist(),
        torch.randint(3, VOCAB, (50,), generator=gen).tolist(),
    ]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(folder, prompts):
    """Each prompt's greedy tokens without speculation, alone."""
    eng = make_engine(folder)
    return [run_all(eng, [p], params=GREEDY)[0] for p in prompts]


class OracleSpeculator(Speculator):
    """Proposes the plain run's own continuation (so most proposals are accepted), with every third
    proposal's second token changed (so some are accepted in part) and the first wrong now and then."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]], k: int) -> None:
        super().__init__(n_max=1, n_min=1, k=k)
        self.refs = refs
        self.calls = 0

    def propose(self, req, room):
        if room <= 0 or speculation_refusal(req.params) is not None:
            return []
        self.calls += 1
        ref = self.refs[tuple(req.prompt_token_ids)]
        pos = req.num_output_tokens
        drafts = list(ref[pos : pos + min(self.k, room)])
        if self.calls % 3 == 0 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % VOCAB
        if self.calls % 7 == 0 and drafts:
            drafts[0] = (drafts[0] + 5) % VOCAB
        return drafts


def with_oracle(engine: Engine, refs: dict, k: int = 4) -> OracleSpeculator:
    oracle = OracleSpeculator(refs, k)
    engine.speculator = engine.scheduler.speculator = oracle
    return oracle


def check_every_rollback(engine: Engine) -> list[int]:
    """Run the pool's integrity check after every rollback of rejected K/V; returns a list counting them."""
    seen: list[int] = []
    sched = engine.scheduler
    drop = sched._drop_computed

    def checked(req, num_tokens):
        before = engine.pool.num_free_blocks
        drop(req, num_tokens)
        engine.check_integrity()
        assert engine.pool.num_free_blocks >= before  # blocks only come back
        assert len(engine.kv.block_ids(req.request_id)) * engine.block_size >= req.num_computed_tokens
        seen.append(num_tokens)

    sched._drop_computed = checked
    return seen


def test_ngram_greedy_equals_plain_alone_and_batched(folder, prompts, plain):
    eng = make_engine(folder, speculative_ngram=3, speculative_ngram_min=1, speculative_tokens=4)
    rollbacks = check_every_rollback(eng)
    assert [run_all(eng, [p], params=GREEDY)[0] for p in prompts] == plain
    assert run_all(eng, prompts, params=GREEDY) == plain
    stats = eng.speculator.stats
    assert stats.num_draft_tokens > 0 and len(rollbacks) == stats.num_verify_steps
    assert eng.pool.num_used_blocks == 0


@pytest.mark.parametrize("k", [1, 4, 7])
def test_oracle_greedy_equals_plain_batched(folder, prompts, plain, k):
    eng = make_engine(folder, speculative_ngram=2)
    oracle = with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, k)
    rollbacks = check_every_rollback(eng)
    steps = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        steps.append(out)
        return out

    eng.scheduler.schedule = spy
    assert run_all(eng, prompts, params=GREEDY) == plain
    stats = oracle.stats
    assert stats.num_accepted_tokens > stats.num_draft_tokens // 2  # mostly accepted ...
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # ... not all
    assert rollbacks
    status = eng.status()
    assert (status.spec_draft_tokens, status.spec_accepted_tokens) == (
        stats.num_draft_tokens,
        stats.num_accepted_tokens,
    )
    # Far fewer steps than tokens: several tokens per step.
    assert len(steps) < len(prompts) * MAX_TOKENS // 2 or k == 1


def test_oracle_greedy_equals_plain_chunked(folder, prompts, plain):
    """A small token budget: prefill chunks and verify steps share it (proposals cut to what is left)."""
    budget = 12
    eng = make_engine(folder, speculative_ngram=2, max_num_batched_tokens=budget)
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 6)
    check_every_rollback(eng)
    orig = eng.scheduler.schedule
    mixed = []

    def spy():
        out = orig()
        assert out.num_tokens <= budget
        if any(s.draft_token_ids for s in out.scheduled) and any(
            not s.draft_token_ids and s.num_new_tokens > 1 for s in out.scheduled
        ):
            mixed.append(out)  # a verify step beside a prefill chunk
        return out

    eng.scheduler.schedule = spy
    assert run_all(eng, prompts, params=GREEDY) == plain
    assert mixed


def test_oracle_greedy_equals_plain_preempted(folder, prompts, plain):
    _, block_bytes = fixed_and_block_bytes(folder)
    eng = make_engine(folder, speculative_ngram=2, kv_cache_memory=14 * block_bytes, block_size=16)
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 5)
    check_every_rollback(eng)
    assert run_all(eng, prompts, params=GREEDY) == plain
    assert eng.scheduler.num_preemptions > 0


def test_stops_inside_accepted_tokens(folder, prompts, plain):
    """A stop token id, EOS-like stop and a stop string met at an accepted proposal end the request there,
    as plain decoding does; max_tokens is never passed."""
    eng = make_engine(folder, speculative_ngram=2)
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 6)
    ref_eng = make_engine(folder)
    for p, out in zip(prompts, plain):
        stop_id = out[13]
        for params in (
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id]),
            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[f"t{out[9]} t{out[10]}"]),
            SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
        ):
            (got,) = list(_final(eng, p, params))
            (want,) = list(_final(ref_eng, p, params))
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert got.outputs[0].text == want.outputs[0].text
            assert got.outputs[0].finish_reason == want.outputs[0].finish_reason
    assert eng.pool.num_used_blocks == 0


def _final(engine, prompt, params):
    for out in engine.stream(prompt, params):
        if out.finished:
            yield out


def test_seeded_sampling_equals_plain(folder, prompts):
    """Sampled with seeds (penalties, top-k / top-p, logprobs): the same tokens and logprobs as plain
    decoding, since every row draws from the request's stream and the stream is replayed after verifying."""
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
        for i in range(len(prompts))
    ]
    params[1] = SamplingParams(
        temperature=0.7, top_k=20, repetition_penalty=1.2, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True
    )
    ref = run_all(make_engine(folder), prompts, params=params)
    eng = make_engine(folder, speculative_ngram=2)
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, ref)}, 4)
    check_every_rollback(eng)
    assert run_all(eng, prompts, params=params) == ref
    assert eng.speculator.stats.num_accepted_tokens > 0


def test_refused_samplers_decode_normally(folder, prompts, plain):
    """DRY cannot be verified exactly: such a request is never given proposals, beside one that is."""
    eng = make_engine(folder, speculative_ngram=2)
    oracle = with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 4)
    dry = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, dry_multiplier=0.8)
    want = run_all(make_engine(folder), [prompts[0]], params=dry)
    seen = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        seen.extend(s for s in out.scheduled if s.draft_token_ids)
        return out

    eng.scheduler.schedule = spy
    got = run_all(eng, [prompts[0], prompts[1]], params=[dry, GREEDY])
    assert got == [want[0], plain[1]]
    assert seen and all(s.request.params.dry_multiplier == 0 for s in seen)
    assert oracle.calls > 0


def test_workspace_plans_the_verify_rows():
    base = EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048)
    spec = EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=2048, speculative_ngram=3, speculative_tokens=5
    )
    assert base.max_sampled_rows == 8 and spec.max_sampled_rows == 48
    assert EngineConfig(max_num_seqs=8, max_num_batched_tokens=20, speculative_ngram=3).max_sampled_rows == 20
    assert EngineConfig(speculative_ngram=3).speculative_ngram_min == 3  # vLLM's default: min = max
    assert EngineConfig(speculative_ngram=3, speculative_ngram_min=1).speculative_ngram_min == 1
    with pytest.raises(ValueError, match="--speculative-ngram-min"):
        EngineConfig(speculative_ngram=2, speculative_ngram_min=3)
    with pytest.raises(ValueError, match="--speculative-tokens"):
        EngineConfig(speculative_ngram=2, speculative_tokens=0)


def test_async_scheduling_reads_before_proposing(folder, prompts, plain):
    """With async scheduling, a request that speculates has its step read before the next is scheduled (a
    proposal needs its last token); outputs are plain decoding's, and no verify row is ever a placeholder."""
    eng = make_engine(folder, speculative_ngram=2, async_scheduling="on")
    assert eng.async_scheduling
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 4)
    check_every_rollback(eng)
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        assert not any(s.draft_token_ids and s.request.num_output_placeholders for s in out.scheduled)
        return out

    eng.scheduler.schedule = spy
    assert run_all(eng, prompts, params=GREEDY) == plain
    assert eng.speculator.stats.num_accepted_tokens > 0


def test_proposals_adapt_to_acceptance():
    """After a rejection a request proposes one more than it had accepted; after a full acceptance twice
    as many, up to k."""
    spec = Speculator(n_max=2, n_min=1, k=8)
    req = Request("r", None, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], SamplingParams())
    assert len(spec.propose(req, 100)) == 8
    spec.record("r", 8, 2)
    assert len(spec.propose(req, 100)) == 3
    spec.record("r", 3, 3)
    assert len(spec.propose(req, 100)) == 6
    spec.record("r", 6, 0)
    assert spec.propose(req, 100) == [2]
    assert spec.propose(req, 0) == []
    spec.forget("r")
    assert len(spec.propose(req, 100)) == 8


def test_triton_backend_verifies_like_plain(folder, prompts, plain):
    """The Triton kernels (interpreted on CPU) attend a verify step's k + 1 queries through the block
    table as a chunk: the same greedy tokens."""
    short = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eng = make_engine(folder, speculative_ngram=2, attention_backend="triton", block_size=16)
    assert eng.runner.attention_backend == "triton"
    with_oracle(eng, {tuple(p): out for p, out in zip(prompts, plain)}, 4)
    check_every_rollback(eng)
    got = run_all(eng, prompts[:2], params=short)
    assert got == [out[:12] for out in plain[:2]]
    assert eng.speculator.stats.num_accepted_tokens > 0
