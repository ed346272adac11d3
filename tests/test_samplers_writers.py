"""The writers' samplers (fitllm/engine/sampling/) against reference tables written from KoboldCpp's sampler
descriptions (tests/sampler_reference.py): each sampler, orders with inactive samplers, XTC's edge cases,
DRY (matches, breakers, prompt + output, incremental = from scratch), mirostat's state, and per-request
seeds reproducible alone and in a batch."""

from __future__ import annotations

import math
import random

import pytest
import sampler_reference as ref
import torch

from fitllm.engine.request import SAMPLER_NAMES, Request, SamplingParams
from fitllm.engine.sampler import Sampler, apply_dry, penalty_terms
from fitllm.engine.sampling.chain import chain_distribution, order_of
from fitllm.engine.sampling.dry import BreakerTable, DryState, dry_penalties

V = 40
LOGITS = (torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2.5).tolist()
CONTEXT = [3, 9, 9, 17, 4]  # the tokens repetition penalties see (all in the near half of the window)


def _engine_table(params: SamplingParams, roll: float = 0.0, context: list[int] = CONTEXT) -> list[float]:
    req = Request("r", None, context, params)
    logits = torch.tensor([LOGITS])
    dist = chain_distribution(
        logits,
        [req],
        torch.tensor([roll], dtype=torch.float64),
        lambda rs: penalty_terms(rs, V, logits.device),
    )
    return dist[0].tolist()


def _reference_table(p: SamplingParams, roll: float = 0.0) -> list[float]:
    c = sorted(([float(i), v] for i, v in enumerate(LOGITS)), key=lambda x: -x[1])[:3000]
    for name in order_of(p):
        if name == "repetition_penalty" and p.repetition_penalty != 1.0:
            c = ref.rep_pen(c, set(CONTEXT), p.repetition_penalty, p.presence_penalty)
        elif name == "top_k":
            c = ref.top_k(c, p.top_k, p.min_p, p.top_n_sigma)
        elif name == "top_a":
            c = ref.top_a(c, p.top_a)
        elif name == "top_p":
            c = ref.min_p(ref.top_p(c, p.top_p), p.min_p)
        elif name == "tfs":
            c = ref.tail_free(c, p.tfs)
        elif name == "typical_p":
            c = ref.typical(c, p.typical_p)
        elif name == "temperature":
            if p.dynatemp_range:
                c = ref.dynatemp(c, p.temperature, p.dynatemp_range, p.dynatemp_exponent, p.smoothing_factor)
            else:
                c = ref.temperature(c, p.temperature, p.smoothing_factor, p.smoothing_curve)
            c = ref.top_n_sigma(c, p.top_n_sigma)
    c = ref.xtc(c, p.xtc_threshold, p.xtc_probability if p.xtc_on else 0.0, roll)
    table = [0.0] * V
    for t, prob in ref.distribution(c).items():
        table[t] = prob
    return table


KOBOLD_DEFAULT = ["repetition_penalty", "top_k", "top_a", "tfs", "typical_p", "top_p", "temperature"]
CASES = {
    "top_a": dict(top_a=0.3),
    "tfs": dict(tfs=0.9),
    "tfs_tight": dict(tfs=0.3),
    "typical": dict(typical_p=0.5),
    "typical_tight": dict(typical_p=0.05),
    "top_p_min_p": dict(top_p=0.8, min_p=0.05),
    "top_k_temp_last": dict(top_k=7, temperature=0.6, sampler_order=KOBOLD_DEFAULT),
    "temp_first": dict(
        top_k=7, temperature=1.7, sampler_order=["repetition_penalty", "temperature", "top_k"]
    ),
    "dynatemp": dict(temperature=1.0, dynatemp_range=0.6, dynatemp_exponent=1.5),
    "dynatemp_after_cut": dict(
        temperature=1.2, dynatemp_range=0.75, min_p=0.05, sampler_order=KOBOLD_DEFAULT
    ),
    "smoothing": dict(smoothing_factor=0.3),
    "smoothing_curve": dict(smoothing_factor=0.3, smoothing_curve=1.8),
    "nsigma": dict(top_n_sigma=1.0, temperature=0.8),
    "rep_pen_first": dict(
        repetition_penalty=1.3,
        repetition_penalty_range=100,
        presence_penalty=0.4,
        top_k=5,
        sampler_order=KOBOLD_DEFAULT,
    ),
    "rep_pen_after_cut": dict(
        repetition_penalty=1.3, top_k=5, sampler_order=["top_k", "repetition_penalty", "temperature"]
    ),
    "rep_pen_not_in_order": dict(repetition_penalty=1.3, top_k=5, sampler_order=["top_k", "temperature"]),
    "everything": dict(
        top_k=30,
        top_a=0.05,
        top_p=0.95,
        min_p=0.01,
        tfs=0.97,
        typical_p=0.9,
        temperature=0.9,
        repetition_penalty=1.1,
        sampler_order=[SAMPLER_NAMES[i] for i in (6, 5, 4, 3, 2, 1, 0)],
    ),  # fmt: skip
    "greedy_in_chain": dict(temperature=0.0, dynatemp_range=0.0, top_a=0.1),
    "xtc_fires": dict(xtc_threshold=0.05, xtc_probability=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_each_sampler_matches_the_reference_table(case):
    params = SamplingParams(**CASES[case])
    want = _reference_table(params)
    got = _engine_table(params)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 2e-5, case
    assert sum(1 for w in want if w > 1e-9) < V or case in ("smoothing", "dynatemp", "nsigma")  # it cut


@pytest.mark.parametrize("seed", range(6))
def test_any_permutation_with_inactive_samplers_is_the_reference_and_inactive_positions_do_not_matter(seed):
    rnd = random.Random(seed)
    order = [SAMPLER_NAMES[i] for i in rnd.sample(range(7), 7)]
    active = dict(top_k=12, top_p=0.9, temperature=0.8, repetition_penalty=1.2)
    params = SamplingParams(sampler_order=order, **active)  # top_a, tfs, typical: off
    got = _engine_table(params)
    assert max(abs(a - b) for a, b in zip(got, _reference_table(params), strict=True)) < 2e-5
    # Moving the inactive samplers anywhere leaves the distribution as it was.
    kept = [s for s in order if s not in ("top_a", "tfs", "typical_p")]
    moved = ["tfs", *kept[:2], "typical_p", *kept[2:], "top_a"]
    again = _engine_table(SamplingParams(sampler_order=moved, **active))
    assert max(abs(a - b) for a, b in zip(got, again, strict=True)) < 1e-6


def test_xtc_with_every_token_above_the_threshold_keeps_only_the_least_likely():
    global LOGITS
    saved = LOGITS
    try:
        LOGITS = [1.0, 1.1, 0.9] + [-50.0] * (V - 3)  # three tokens near a third each
        p = SamplingParams(xtc_threshold=0.1, xtc_probability=1.0)
        got = _engine_table(p, roll=0.3)
        assert got[2] == pytest.approx(1.0, abs=1e-6)  # the least likely of those above the threshold
        assert got == pytest.approx(_reference_table(p, roll=0.3), abs=1e-6)
        # The roll missed (>= probability), or the threshold is above 0.5 (off): nothing changes.
        plain = _engine_table(SamplingParams())
        assert _engine_table(
            SamplingParams(xtc_threshold=0.1, xtc_probability=0.5), roll=0.7
        ) == pytest.approx(plain)
        assert _engine_table(SamplingParams(xtc_threshold=0.6, xtc_probability=1.0)) == pytest.approx(plain)
    finally:
        LOGITS = saved


# ---- DRY -------------------------------------------------------------------------------------------------

A, B, C, D, Q, Y, NL = 1, 2, 3, 4, 5, 6, 7


def _dry(tokens, allowed=2, last_n=0, breakers=(), mult=0.8, base=1.75):
    state = DryState()
    state.update(list(tokens))
    heads = {b: [()] for b in breakers}
    return dry_penalties(state, mult, base, allowed, last_n, heads)


def test_dry_matches_koboldcpps_example_and_the_brute_force_reference():
    # KoboldCpp's own example: "a b c c b c y a b c": c would extend "a b c" (3), y "b c" (2), b "c" (1).
    seq = [A, B, C, C, B, C, Y, A, B, C]
    got = _dry(seq, allowed=1)
    assert got == pytest.approx({C: 0.8 * 1.75**2, Y: 0.8 * 1.75**1, B: 0.8})
    assert got == pytest.approx(ref.dry(seq, 0.8, 1.75, 1, 0, set()))


def test_dry_stops_at_a_sequence_breaker():
    plain = [Q, A, B, C, D, Q, A, B, C]
    assert _dry(plain) == pytest.approx({D: 0.8 * 1.75**2})  # "q a b c" repeats: 4 - 2
    # With q a breaker the match after it is "a b c" only: 3 - 2.
    assert _dry(plain, breakers=(Q,)) == pytest.approx({D: 0.8 * 1.75})
    assert _dry(plain, breakers=(Q,)) == pytest.approx(ref.dry(plain, 0.8, 1.75, 2, 0, {Q}))
    # Fewer than allowed_length tokens after the latest breaker: no penalty at all.
    assert _dry([A, B, C, NL, A, B, C, NL, A], breakers=(NL,)) == {}


def test_dry_multi_token_breakers_from_the_vocabulary():
    # llama.cpp's rule: a token containing the breaker is a breaker alone; a token ending with a prefix of
    # it is a head, the rest of the breaker tokenized as its tail.
    texts = ["a", "b", "x*", "*", "\n", "x\n", "fo", "o:", ":", "zz"]
    table = BreakerTable(lambda: texts, lambda s: [texts.index(s)] if s in texts else [])
    heads = table.heads(["*", "o:"])
    assert heads[2] == [()] and heads[3] == [()]  # "x*", "*"
    assert heads[6] == [(8,)] and heads[7] == [()]  # "fo" + ":", "o:"
    assert 4 not in heads and 9 not in heads
    # "fo" followed by ":" acts as a breaker: the match stops after it.
    state = DryState()
    seq = [0, 1, 0, 1, 6, 8, 0, 1]
    state.update(seq)
    assert dry_penalties(state, 1.0, 2.0, 2, 0, heads) == {}  # "a b" after "fo :" is only 2 tokens: not > 2
    assert dry_penalties(state, 1.0, 2.0, 2, 0, {}) == pytest.approx(ref.dry(seq, 1.0, 2.0, 2, 0, set()))


def test_dry_over_prompt_and_output_incremental_equals_from_scratch():
    rnd = random.Random(0)
    tokens = [rnd.randrange(6) for _ in range(60)]
    tokens += tokens[10:30]  # a long repeat
    state = DryState()
    state.update(tokens[:25])  # the prompt
    for n in range(26, len(tokens) + 1):  # then one output token at a time
        state.update(tokens[:n])
        for last_n, breakers in ((0, ()), (17, ()), (0, (5,))):
            heads = {b: [()] for b in breakers}
            got = dry_penalties(state, 0.8, 1.75, 2, last_n, heads)
            assert got == pytest.approx(ref.dry(tokens[:n], 0.8, 1.75, 2, last_n, set(breakers))), (n, last_n)
    # A rewind (fewer tokens than seen) starts over and agrees again.
    state.update(tokens[:40])
    assert dry_penalties(state, 0.8, 1.75, 2, 0, {}) == pytest.approx(
        ref.dry(tokens[:40], 0.8, 1.75, 2, 0, set())
    )


def test_dry_reaches_the_logits_of_greedy_and_sampled_rows_over_prompt_and_output():
    prompt, output = [A, B, C, D, A], [B, C]  # "a b c" repeats across the prompt / output boundary
    logits = torch.zeros(2, 10)
    logits[:, D] = 5.0  # the model would repeat "d"
    reqs = []
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, dry_multiplier=3.0, dry_base=2.0, seed=1)
        req = Request(f"r{temperature}", None, prompt, params)
        req.token_ids += output
        reqs.append(req)
    got = logits.clone()
    apply_dry(got, reqs, None)
    assert got[:, D].tolist() == [5.0 - 3.0 * 2.0, 5.0 - 3.0 * 2.0]  # 3 * 2 ** (3 - 2)
    assert (got[:, :D] == 0).all() and (got[:, D + 1 :] == 0).all()
    assert Sampler([]).sample(logits.clone(), reqs[:1]).result().token_ids != [D]  # greedy avoids it


# ---- mirostat ----------------------------------------------------------------------------------------------


def _mirostat_v2_reference(
    logits: list[float], mu: float, tau: float, eta: float, u: float
) -> tuple[int, float]:
    c = sorted(([float(i), v] for i, v in enumerate(logits)), key=lambda x: -x[1])
    p = ref.softmax(c)
    keep = next((i for i, v in enumerate(p) if -math.log2(v) > mu), len(c))
    c = c[: max(keep, 1)]
    p = ref.softmax(c)
    cum, pick = 0.0, len(p) - 1
    for i, v in enumerate(p):
        cum += v
        if u * 1.0 < cum:
            pick = i
            break
    return int(c[pick][0]), mu - eta * (-math.log2(p[pick]) - tau)


def test_mirostat_v2_follows_the_reference_and_keeps_mu_per_request():
    params = SamplingParams(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.5, temperature=1.0, seed=11)
    req = Request("m", None, [1], params)
    sampler = Sampler([])
    gen = torch.Generator().manual_seed(11)
    mu = 2 * 3.0
    for _ in range(8):
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
        want, mu = _mirostat_v2_reference(LOGITS, mu, 3.0, 0.5, u)
        got = sampler.sample(torch.tensor([LOGITS]), [req]).result().token_ids[0]
        assert got == want
        assert req.sampler_state.mirostat_mu.item() == pytest.approx(mu, abs=1e-4)
        req.token_ids.append(got)
    # Another request starts from 2 * tau, whatever the first one's mu is now.
    other = Request("n", None, [1], params)
    sampler.sample(torch.tensor([LOGITS]), [other])
    first_u = torch.rand((), generator=torch.Generator().manual_seed(11), dtype=torch.float64).item()
    assert other.sampler_state.mirostat_mu.item() == pytest.approx(
        _mirostat_v2_reference(LOGITS, 6.0, 3.0, 0.5, first_u)[1], abs=1e-4
    )


def test_mirostat_v1_runs_and_moves_mu_towards_tau():
    params = SamplingParams(mirostat=1, mirostat_tau=2.0, mirostat_eta=0.3, seed=3)
    req = Request("m", None, [1], params)
    sampler = Sampler([])
    for _ in range(20):
        tok = sampler.sample(torch.tensor([LOGITS]), [req]).result().token_ids[0]
        assert 0 <= tok < V
        req.token_ids.append(tok)
    mu = req.sampler_state.mirostat_mu.item()
    assert math.isfinite(mu) and mu != 4.0


# ---- seeds ---------------------------------------------------------------------------------------------------


def test_seeded_requests_are_reproducible_alone_and_in_a_batch():
    writers = dict(
        xtc_threshold=0.05, xtc_probability=0.5, dry_multiplier=0.8, top_a=0.01, typical_p=0.95,
        sampler_order=KOBOLD_DEFAULT, temperature=0.9,
    )  # fmt: skip

    def make(name: str, **kw) -> Request:
        return Request(name, None, [1, 2, 3, 1, 2], SamplingParams(**kw))

    # The same logits per row in both runs: each row is fed the logits of its own generator.
    def run(reqs, per_row_seed):
        sampler = Sampler([], seed=5)
        gens = {r.request_id: torch.Generator().manual_seed(per_row_seed[r.request_id]) for r in reqs}
        for _ in range(12):
            logits = torch.stack([torch.randn(V, generator=gens[r.request_id]) * 2 for r in reqs])
            for r, t in zip(reqs, sampler.sample(logits, reqs).result().token_ids, strict=True):
                r.token_ids.append(t)
        return {r.request_id: r.output_token_ids for r in reqs}

    feeds = {"a": 1, "b": 2, "c": 3, "d": 4}
    alone = run([make("a", seed=7, **writers)], feeds)["a"]
    batch = run(
        [
            make("b", **writers),
            make("a", seed=7, **writers),
            make("c", temperature=0.7),
            make("d", mirostat=2, seed=2),
        ],
        feeds,
    )
    assert batch["a"] == alone
    assert len(set(alone)) > 1  # it sampled, not a constant


def test_breakers_from_the_default_models_vocabulary():
    from fitllm.loader import open_model

    tok = open_model(None).tokenizer()
    table = BreakerTable.for_tokenizer(tok)
    heads = table.heads(["\n", "*", "You:"])
    (nl,) = tok.encode("\n", add_special_tokens=False)
    assert () in heads[nl]  # the newline token breaks alone
    you = tok.encode(" You:", add_special_tokens=False)
    # "You:" spans tokens here: some head token ends with a prefix of it, its tail the rest's tokens.
    assert any(tail and list(tail) == you[-len(tail) :] for tails in heads.values() for tail in tails)
    assert table.heads(["\n", "*", "You:"]) is heads  # cached per breaker list
