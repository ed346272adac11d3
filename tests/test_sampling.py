"""Sampler and SamplingParams (stop strings and streaming text: test_detokenizer.py).

Every expected value comes from a plain reference written here (argmax, sort-based nucleus, dictionary
penalties, log_softmax) or from the real tokenizer's own decode.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampler import (
    Sampler,
    apply_bias_and_min_tokens,
    apply_penalties,
    sample_truncated,
)

EOS = 3
V = 50


def make_req(params: SamplingParams, prompt=(0, 1), output=(), rid="r") -> Request:
    req = Request(rid, None, list(prompt), params)
    req.token_ids.extend(output)
    return req


def rand_logits(n: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- SamplingParams --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-2),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3.0),
        dict(max_tokens=0),
        dict(min_tokens=5, max_tokens=4),
        dict(logprobs=21),
        dict(seed=1.5),
        dict(logit_bias={3: float("inf")}),
    ],
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_param_normalisation():
    p = SamplingParams(top_k=-1, stop="end")
    assert p.top_k == 0 and p.stop == ["end"]
    assert SamplingParams(stop=["", "x"]).stop == ["x"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


# ---- greedy and seeded sampling ----------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = rand_logits(6)
    reqs = [make_req(SamplingParams(temperature=0), rid=f"r{i}") for i in range(6)]
    out = Sampler([EOS])(logits.clone(), reqs)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6 and out.sampled_logprob == [None] * 6


def test_greedy_ignores_top_k_top_p_but_applies_bias():
    logits = rand_logits(2)
    target = int(logits[1].argmin())
    reqs = [
        make_req(SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9), rid="a"),
        make_req(SamplingParams(temperature=0, logit_bias={target: 1000.0}), rid="b"),
    ]
    out = Sampler([EOS])(logits.clone(), reqs)
    assert out.token_ids == [int(logits[0].argmax()), target]


def _seeded_run(logits_rows: dict[str, torch.Tensor], batches: list[list[tuple[str, SamplingParams]]]):
    """Run several steps; each step samples the given rows (rid, params) in the given order."""
    reqs: dict[str, Request] = {}
    tokens: dict[str, list[int]] = {}
    sampler = Sampler([EOS], seed=123)
    for batch in batches:
        rows = []
        for rid, params in batch:
            if rid not in reqs:
                reqs[rid] = make_req(params, rid=rid)
            rows.append(reqs[rid])
        logits = torch.stack([logits_rows[r.request_id] for r in rows])
        out = sampler(logits, rows)
        for r, t in zip(rows, out.token_ids):
            tokens.setdefault(r.request_id, []).append(t)
    return tokens


def test_seeded_sampling_independent_of_batch():
    flat = torch.zeros(V)  # uniform: every draw depends on the random stream only
    rows = {f"x{i}": rand_logits(1, seed=i)[0] for i in range(6)}
    rows["s"] = flat
    rows["s2"] = flat
    seeded = SamplingParams(temperature=1.0, seed=42)
    others = [
        ("x0", SamplingParams(temperature=0.7)),
        ("x1", SamplingParams(temperature=1.3, top_k=5, seed=1)),
        ("x2", SamplingParams(temperature=0)),
        ("x3", SamplingParams(top_p=0.5, min_p=0.1)),
        ("x4", SamplingParams(temperature=2.0, seed=9)),
        ("x5", SamplingParams(repetition_penalty=1.3)),
    ]
    steps = 6
    alone = _seeded_run(rows, [[("s", seeded)]] * steps)["s"]
    # The same seed in other batch compositions and orders, which change from step to step.
    mixed_batches = []
    for k in range(steps):
        batch = others[: k + 1] + [("s", seeded)]
        batch = batch[k % 3 :] + batch[: k % 3]  # rotate: the seeded row moves around
        mixed_batches.append(batch)
    mixed = _seeded_run(rows, mixed_batches)["s"]
    reversed_batches = [list(reversed(b)) for b in mixed_batches]
    rev = _seeded_run(rows, reversed_batches)["s"]
    assert alone == mixed == rev
    # Two requests with the same seed in one batch draw identical sequences; another seed does not.
    twin = _seeded_run(rows, [[("s", seeded), ("s2", seeded)]] * steps)
    assert twin["s"] == twin["s2"] == alone
    other_seed = _seeded_run(rows, [[("s", SamplingParams(seed=43))]] * steps)["s"]
    assert other_seed != alone


def test_unseeded_rows_follow_engine_seed():
    logits = torch.zeros(4, V)
    reqs = [make_req(SamplingParams(), rid=f"r{i}") for i in range(4)]
    a = Sampler([EOS], seed=5)(logits.clone(), reqs).token_ids
    b = Sampler([EOS], seed=5)(logits.clone(), reqs).token_ids
    c = Sampler([EOS], seed=6)(logits.clone(), reqs).token_ids
    assert a == b and a != c


# ---- top-k / top-p / min-p ------------------------------------------------------------------------------------


def reference_support(logits: torch.Tensor, k: int, p: float, min_p: float) -> tuple[list[int], list[float]]:
    """Tokens (most likely first) and their renormalised probabilities after top-k, then top-p measured on
    the top-k distribution, then min-p; straight from the definitions, in float64."""
    order = logits.double().argsort(descending=True).tolist()
    if k > 0:
        order = order[:k]
    probs = torch.softmax(logits.double()[order], dim=0).tolist()
    kept, total = [], 0.0
    for t, q in zip(order, probs):
        if total >= p:  # the smallest set whose mass reaches p
            break
        kept.append((t, q))
        total += q
    top = kept[0][1]
    kept = [(t, q) for t, q in kept if q >= min_p * top]
    z = sum(q for _, q in kept)
    return [t for t, _ in kept], [q / z for _, q in kept]


def reference_draw(tokens: list[int], probs: list[float], u: float) -> tuple[int, float]:
    """Inverse CDF over the kept tokens, most likely first; also the distance of u to the nearest edge."""
    cdf = 0.0
    for t, q in zip(tokens, probs):
        lo, cdf = cdf, cdf + q
        if u < cdf:
            return t, min(u - lo, cdf - u)
    return tokens[-1], 0.0


U_GRID = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)[:-1] + 0.00025


def _truncated_grid(
    logits: torch.Tensor, ks: list[int], ps: list[float], min_ps: list[float], grid: torch.Tensor = U_GRID
) -> torch.Tensor:
    """sample_truncated of every row at every u of the grid in one batch: [rows, len(grid)] token ids."""
    n, g = len(ks), len(grid)
    rep = lambda xs, dtype: torch.tensor(xs, dtype=dtype).repeat_interleave(g)  # noqa: E731
    got = sample_truncated(
        logits.repeat_interleave(g, dim=0),
        rep(ks, torch.long),
        rep(ps, logits.dtype),
        rep(min_ps, logits.dtype),
        grid.to(logits.dtype).repeat(n),
    )
    return got.view(n, g)


def _check_truncated(
    logits: torch.Tensor, ks: list[int], ps: list[float], min_ps: list[float], grid: torch.Tensor = U_GRID
) -> None:
    got = _truncated_grid(logits, ks, ps, min_ps, grid)
    for row in range(len(ks)):
        p32 = torch.tensor(ps[row], dtype=torch.float32).item()
        tokens, probs = reference_support(logits[row], ks[row], p32, min_ps[row])
        for j, u in enumerate(grid.tolist()):
            want, margin = reference_draw(tokens, probs, u)
            if got[row, j] != want:
                assert margin < 1e-4, (row, u, int(got[row, j]), want, ks[row], ps[row], min_ps[row])
                assert got[row, j] in tokens


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ks=st.lists(st.integers(1, V + 5), min_size=1, max_size=3))
def test_top_k_keeps_exactly_k_largest(seed, ks):
    logits = rand_logits(len(ks), seed=seed, scale=0.5)  # flat enough that every kept token gets drawn
    n = len(ks)
    got = _truncated_grid(logits, ks, [1.0] * n, [0.0] * n)
    for row, k in enumerate(ks):
        assert set(got[row].tolist()) == set(logits[row].topk(min(k, V)).indices.tolist())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 3, 10, 40]), st.floats(0.05, 1.0), st.sampled_from([0.0, 0.05, 0.3])
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_truncated_sampling_matches_reference(seed, rows):
    logits = rand_logits(len(rows), seed=seed, scale=2.0)
    _check_truncated(logits, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


@pytest.mark.parametrize(
    "k, p, min_p",
    [
        (0, 0.9, 0.0),  # nucleus wider than the first candidate cap
        (0, 0.3, 0.0),
        (50, 0.95, 0.0),  # top-k inside the first cap
        (1000, 1.0, 0.0),  # top-k between the caps, no top-p
        (0, 1.0, 0.02),  # min-p only
        (3000, 0.9, 0.0),  # top-k = whole vocabulary
        (1000, 0.8, 0.0),  # top-k between the caps with top-p
        (2500, 0.97, 0.0),  # top-k above the second cap with top-p
    ],
)
def test_truncated_sampling_large_vocab(k, p, min_p):
    """A vocabulary larger than the candidate caps (128, 2048), so every cascade level is used."""
    logits = rand_logits(2, vocab=3000, seed=k + int(p * 100), scale=1.5)
    grid = torch.linspace(0.0, 1.0, 301, dtype=torch.float64)[:-1] + 0.0013
    _check_truncated(logits, [k, k], [p, p], [min_p, min_p], grid)


def test_top_p_measured_on_top_k_distribution_with_large_vocab():
    """top_k above the first candidate cap (128) with a long tail: top-p must still be renormalised over top-k.

    Full distribution: 100 head tokens hold 40% of the mass, 900 tail tokens 60%. top_k=300 keeps the head
    plus 200 tail tokens (53% of the mass), so the head is 75% of the top-k distribution and top_p=0.3
    keeps the first 40 head tokens. Measured on the full distribution it would keep 75.
    """
    vocab = 1000
    probs = torch.cat([torch.full((100,), 0.4 / 100), torch.full((900,), 0.6 / 900)])
    logits = (probs.double().log() - torch.arange(vocab, dtype=torch.float64) * 1e-6).float().unsqueeze(0)
    tokens, _ = reference_support(logits[0], 300, 0.3, 0.0)
    assert len(tokens) == 40
    _check_truncated(logits, [300], [0.3], [0.0])


def test_sampler_support_with_large_vocab_top_k_and_top_p():
    vocab = 1000
    probs = torch.cat([torch.full((100,), 0.4 / 100), torch.full((900,), 0.6 / 900)])
    logits = (probs.double().log() - torch.arange(vocab, dtype=torch.float64) * 1e-6).float()
    drawn = _draws(logits, SamplingParams(top_k=300, top_p=0.3), n=800)
    assert max(drawn) < 40, f"sampled token {max(drawn)} is outside the top-k-renormalised nucleus"


def _draws(logits_row: torch.Tensor, params: SamplingParams, n: int = 600, seed: int = 0) -> Counter:
    reqs = [make_req(params, rid=f"r{i}") for i in range(n)]
    out = Sampler([EOS], seed=seed)(logits_row.expand(n, -1).clone(), reqs)
    return Counter(out.token_ids)


def test_sampling_support_respects_top_k_top_p_min_p():
    probs = torch.tensor([0.4, 0.2, 0.12, 0.08, 0.07, 0.07, 0.06])
    logits = probs.log()
    assert set(_draws(logits, SamplingParams(top_k=2))) == {0, 1}
    # top_p 0.65: 0.4 + 0.2 = 0.6 < 0.65 <= 0.72, so the nucleus is {0, 1, 2}.
    assert set(_draws(logits, SamplingParams(top_p=0.65))) == {0, 1, 2}
    # min_p 0.25: threshold 0.1 keeps {0, 1, 2}; 0.08 is out.
    assert set(_draws(logits, SamplingParams(min_p=0.25))) == {0, 1, 2}
    assert set(_draws(logits, SamplingParams())) == set(range(7))


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temp in (0.5, 1.0, 2.0):
        n = 4000
        counts = _draws(logits, SamplingParams(temperature=temp), n=n, seed=7)
        expected = torch.softmax(logits / temp, dim=0)
        for t in range(4):
            sd = math.sqrt(n * expected[t].item() * (1 - expected[t].item()))
            assert abs(counts[t] - n * expected[t].item()) < 5 * sd + 1


# ---- penalties, bias, min_tokens -------------------------------------------------------------------------------


def reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], rep: float, pres: float, freq: float
) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t, c in Counter(output).items():
        out[t] -= freq * c + pres
    return out


penalty_rows = st.tuples(
    st.lists(st.integers(0, 19), min_size=1, max_size=8),  # prompt
    st.lists(st.integers(0, 19), max_size=10),  # output
    st.sampled_from([1.0, 0.8, 1.2, 2.0]),
    st.sampled_from([0.0, 0.5, -1.0, 2.0]),
    st.sampled_from([0.0, 0.3, -0.7, 2.0]),
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(penalty_rows, min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_penalties_match_reference(rows, seed):
    logits = rand_logits(len(rows), vocab=20, seed=seed)
    reqs = [
        make_req(
            SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq),
            prompt,
            output,
            rid=f"r{i}",
        )
        for i, (prompt, output, rep, pres, freq) in enumerate(rows)
    ]
    got = logits.clone()
    apply_penalties(got, reqs)
    for i, (prompt, output, rep, pres, freq) in enumerate(rows):
        expected = reference_penalties(logits[i].tolist(), prompt, output, rep, pres, freq)
        assert torch.allclose(got[i], torch.tensor(expected), atol=1e-5), (i, rows[i])
    # And the greedy sampler picks the argmax of the penalised logits.
    greedy = [
        make_req(
            SamplingParams(
                temperature=0, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq
            ),
            prompt,
            output,
            rid=f"g{i}",
        )
        for i, (prompt, output, rep, pres, freq) in enumerate(rows)
    ]
    tokens = Sampler([EOS])(logits.clone(), greedy).token_ids
    for i, (prompt, output, rep, pres, freq) in enumerate(rows):
        expected = reference_penalties(logits[i].tolist(), prompt, output, rep, pres, freq)
        assert expected[tokens[i]] == pytest.approx(max(expected), abs=1e-5)


def test_logit_bias_added():
    logits = rand_logits(2)
    bias = {0: 2.5, 7: -1.25, V - 1: 100.0}
    reqs = [make_req(SamplingParams(logit_bias=bias), rid="a"), make_req(SamplingParams(), rid="b")]
    got = logits.clone()
    apply_bias_and_min_tokens(got, reqs, [EOS])
    expected = logits[0].clone()
    for t, b in bias.items():
        expected[t] += b
    assert torch.allclose(got[0], expected)
    assert torch.equal(got[1], logits[1])


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 8] = 9.0
    logits[0, 11] = 8.0
    params = SamplingParams(temperature=0, min_tokens=3, max_tokens=10, stop_token_ids=[8])
    early = make_req(params, output=[1, 2])  # 2 < 3 output tokens
    assert Sampler([EOS])(logits.clone(), [early]).token_ids == [11]
    done = make_req(params, output=[1, 2, 5])
    assert Sampler([EOS])(logits.clone(), [done]).token_ids == [EOS]
    # ignore_eos: EOS is not banned, only the stop tokens are.
    ign = make_req(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[EOS + 5]))
    assert Sampler([EOS])(logits.clone(), [ign]).token_ids == [EOS]
    # And in random sampling EOS never comes out before min_tokens.
    counts = _draws(logits[0], SamplingParams(min_tokens=1, max_tokens=2), n=200)
    assert EOS not in counts


# ---- logprobs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5])
def test_logprobs_of_raw_logits(n):
    logits = rand_logits(3, seed=11)
    reqs = [
        make_req(SamplingParams(temperature=0, logprobs=n), rid="a"),
        make_req(SamplingParams(temperature=0.8, logprobs=n, seed=3), rid="b"),
        # Penalties change the sampled token's choice but not the reported (raw) logprobs.
        make_req(SamplingParams(temperature=0, logprobs=n, logit_bias={2: 50.0}), rid="c"),
    ]
    out = Sampler([EOS])(logits.clone(), reqs)
    assert out.token_ids[2] == 2
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i in range(3):
        tok = out.token_ids[i]
        entry = out.logprobs[i]
        assert out.sampled_logprob[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert entry[tok].logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert entry[tok].rank == int((ref[i] > ref[i, tok]).sum()) + 1
        top = ref[i].argsort(descending=True)[:n].tolist()
        assert set(entry) == set(top) | {tok}
        for rank, t in enumerate(top, start=1):
            assert entry[t].rank == rank
            assert entry[t].logprob == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert out.logprobs[0][out.token_ids[0]].rank == 1  # greedy picks rank 1


def test_logprobs_only_for_rows_that_ask():
    logits = rand_logits(2)
    reqs = [make_req(SamplingParams(logprobs=2), rid="a"), make_req(SamplingParams(), rid="b")]
    out = Sampler([EOS])(logits, reqs)
    assert out.logprobs[1] is None and out.sampled_logprob[1] is None
    assert out.logprobs[0] is not None and len(out.logprobs[0]) in (2, 3)


# ---- KoboldCpp-style penalties and sampler order ---------------------------------------------------------


def kobold_rep_pen_reference(
    logits: list[float], context: list[int], rep: float, n: int, slope: float, presence: float
):
    """KoboldCpp's sample_rep_pen, written from its description: the last n context tokens, the newer half
    penalised by rep, the older half by 1 + (rep - 1) * slope, presence subtracted once per windowed token."""
    window = context[-n:]
    s = n // 2
    padded = [None] * (n - len(window)) + window  # KoboldCpp pads short contexts at the front
    far, near = set(padded[:s]) - {None}, set(padded[s:]) - {None}
    slope = slope if 0 < slope <= 1 else 1.0
    rep_far = 1 + (rep - 1) * slope if rep > 1 else rep
    out = list(logits)
    for t in range(len(out)):
        p = rep if t in near else rep_far if t in far else None
        if p is not None:
            out[t] = out[t] * p if out[t] <= 0 else out[t] / p
            out[t] -= presence
    return out


@pytest.mark.parametrize(
    ("n", "slope", "prompt", "output"),
    [
        (8, 0.5, (5, 6, 7, 8, 9, 10), (11, 12, 13)),  # window covers part of the prompt and all output
        (4, 0.7, (5, 6, 7), (8, 9, 5)),  # a token in both halves counts as near
        (16, 0.0, (1, 2), (3,)),  # shorter context than the range; slope 0 means no slope
        (3, 1.0, (20, 21, 22, 23), ()),  # odd range
    ],
)
def test_kobold_windowed_repetition_penalty_matches_reference(n, slope, prompt, output):
    logits = rand_logits(1, seed=n)
    params = SamplingParams(
        repetition_penalty=1.3,
        repetition_penalty_range=n,
        repetition_penalty_slope=slope,
        presence_penalty=0.4,
    )
    req = make_req(params, prompt=prompt, output=output)
    got = logits.clone()
    apply_penalties(got, [req])
    want = kobold_rep_pen_reference(logits[0].tolist(), list(prompt) + list(output), 1.3, n, slope, 0.4)
    assert torch.allclose(got[0], torch.tensor(want), atol=1e-6)


def test_hf_repetition_penalty_unchanged_by_the_window_fields():
    logits = rand_logits(2, seed=9)
    hf = make_req(SamplingParams(repetition_penalty=1.5, presence_penalty=0.3), prompt=(1, 2), output=(3, 3))
    got = logits.clone()
    apply_penalties(got, [hf, hf])
    want = logits.clone()
    for t in (1, 2, 3):  # HF: every prompt and output token, full penalty
        want[:, t] = torch.where(want[:, t] > 0, want[:, t] / 1.5, want[:, t] * 1.5)
    want[:, 3] -= 0.3  # OpenAI presence: output tokens only
    assert torch.allclose(got, want, atol=1e-6)


def test_temperature_last_cuts_the_untempered_distribution():
    # Token 0 holds 60% before temperature; top_p 0.5 keeps it alone. Tempered first (T = 5), the
    # distribution flattens and the nucleus takes many tokens.
    logits = torch.full((1, V), 0.0)
    logits[0, 0] = math.log(0.6 * (V - 1) / 0.4)
    first = Counter(_draws(logits[0], SamplingParams(temperature=5.0, top_p=0.5), n=300))
    last = Counter(
        _draws(logits[0], SamplingParams(temperature=5.0, top_p=0.5, temperature_last=True), n=300)
    )
    assert set(last) == {0}
    assert len(first) > 5
    # With a wider cut, temperature still reshapes the survivors: top_k 2, T large -> both about equal.
    logits2 = torch.full((1, V), -10.0)
    logits2[0, 0], logits2[0, 1] = 2.0, 0.0  # 88% / 12% untempered
    draws = Counter(
        _draws(logits2[0], SamplingParams(temperature=50.0, top_k=2, temperature_last=True), n=600)
    )
    assert set(draws) == {0, 1} and 0.4 < draws[1] / 600 < 0.6


@pytest.mark.parametrize("tempered_after", [False, True])
def test_cuda_single_pass_in_row_chunks_equals_the_candidate_retries(tempered_after):
    """CUDA cuts top-k/top-p/min-p in one pass over the sorted vocabulary (no host decisions on device
    values), in row chunks; it samples exactly what the CPU's candidate retries sample (no ties here)."""

    gen = torch.Generator().manual_seed(0)
    n, vocab = 40, 3000
    logits = torch.randn(n, vocab, generator=gen) * 3
    top_k = torch.randint(0, 60, (n,), generator=gen)
    top_k[::4] = 0  # some rows without top-k, so top-p reaches past the first candidates
    top_p = torch.rand(n, generator=gen) * 0.6 + 0.4
    min_p = torch.rand(n, generator=gen) * 0.05
    u = torch.rand(n, generator=gen)
    after = torch.rand(n, generator=gen) + 0.5 if tempered_after else None
    retries = sample_truncated(logits, top_k, top_p, min_p, u, after)
    single = sample_truncated(logits, top_k, top_p, min_p, u, after, caps=(None,))
    assert torch.equal(retries, single)


@pytest.mark.parametrize("caps", [None, (None,)], ids=["cpu-retries", "cuda-single-pass"])
def test_nucleus_over_a_flat_distribution_stays_in_the_planned_sampling_workspace(caps, monkeypatch):
    """A nucleus that needs the whole vocabulary (a flat distribution) goes through the whole-vocabulary pass
    in row chunks: the sampler's peak stays within the 12 bytes per row and entry planned for sampling (the
    float logits are there before it, so 8 more), plus the small capped retries."""
    import fitllm.engine.sampler as sampler_module
    from fitllm.memory.profile import measure_peak_bytes

    if caps is not None:
        monkeypatch.setattr(sampler_module, "_CANDIDATE_CAPS", caps)
    n, vocab = 32, 20000
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 0.05
    reqs = [Request(f"r{i}", None, [1], SamplingParams(temperature=0.8, top_p=0.9, seed=i)) for i in range(n)]
    sampler = Sampler([EOS])
    peak = measure_peak_bytes(lambda: sampler.sample(logits, reqs), torch.device("cpu"))
    assert peak <= n * vocab * 8 + n * 2048 * 40
    tokens = sampler.sample(logits, reqs).tokens
    assert len(set(tokens.tolist())) > n // 2  # flat: the samples spread over the vocabulary
