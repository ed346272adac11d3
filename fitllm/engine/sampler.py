"""Batched sampling: penalties, biases, temperature, top-k / top-p / min-p, per-request random streams.

One call per step over the rows that sample. Rows that ask for nothing special cost nothing extra:
each transformation runs only on the rows that need it. Sampling runs where the logits are (on a GPU, no
[rows, vocab] copy to the host); the uniforms come from host generators (seeded streams stay reproducible
across devices) and the step's tokens reach the host in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.engine.banned import apply_bans
from fitllm.engine.request import Logprob, Request
from fitllm.engine.sampling.chain import sample_chain
from fitllm.engine.sampling.draw import inverse_cdf
from fitllm.engine.sampling.dry import BreakerTable
from fitllm.engine.sampling.penalties import apply_dry, apply_penalties, penalty_terms
from fitllm.engine.structured.masks import GrammarMasks, apply_constraints
from fitllm.memory.transfer import to_device

__all__ = ["Sampler", "SampledBatch", "apply_dry", "apply_penalties", "penalty_terms", "sample_truncated"]


@dataclass(slots=True)
class SampleResult:
    """Sampled token per row, and (when asked) its logprob, rank and the top-n alternatives."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    sampled_logprob: list[float | None]


def apply_bias_and_min_tokens(logits: torch.Tensor, requests: list[Request], eos_ids: list[int]) -> None:
    """logit_bias, and EOS / stop tokens forbidden until min_tokens have been generated."""
    for i, r in enumerate(requests):
        p = r.params
        if p.logit_bias:
            ids = to_device(list(p.logit_bias), torch.long, logits.device)
            vals = to_device(list(p.logit_bias.values()), logits.dtype, logits.device)
            logits[i].index_add_(0, ids, vals)
        # An output placeholder (async scheduling: a token sampled but not yet on the host) counts.
        if p.min_tokens and r.num_output_tokens + r.num_output_placeholders < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[i].index_fill_(0, to_device(banned, torch.long, logits.device), float("-inf"))


# Candidate counts tried for truncated sampling: a top-k of a few hundred tokens is ~40x cheaper than
# sorting the whole vocabulary, and a nucleus rarely needs more. Rows whose cut falls beyond a cap retry
# with the next; the last entry (None) means the whole vocabulary, so the result is always exact.
# On a GPU one pass over the sorted vocabulary is cheap and, unlike the retries, needs no host decision on
# device values (which would make the host wait for the step). A whole-vocabulary pass (the GPU's, or the
# CPU's last retry) holds about 33 bytes per vocabulary entry beyond the float logits (sorted values and
# ids, probabilities, running sums, masks), so rows go through it in chunks. The planner gives sampling 12
# bytes per entry and row: the float logits (4), the tempered copy (4), and 4 for the pass.
_CANDIDATE_CAPS = (128, 2048, None)
_CANDIDATE_CAPS_CUDA = (None,)
_SINGLE_PASS_BYTES, _PLANNED_BYTES = 33, 4


def sample_truncated(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    u: torch.Tensor,
    temperature_after: torch.Tensor | None = None,
    caps: tuple[int | None, ...] | None = None,
) -> torch.Tensor:
    """Sample each row from its top-k, then top-p nucleus (renormalised after top-k), then min-p survivors.

    top_k: 0 = off; top_p: 1 = off; min_p: 0 = off; u: one uniform in [0, 1) per row; temperature_after:
    per row, a temperature applied to the survivors only after the cut (KoboldCpp's default order), 1 = none.
    caps: candidate counts to try (default: retries on CPU, one whole-vocabulary pass on CUDA). The
    whole-vocabulary pass runs in row chunks, so its working set stays within the sampling workspace.
    """
    n, vocab = logits.shape
    device = logits.device
    if caps is None:
        caps = _CANDIDATE_CAPS_CUDA if device.type == "cuda" else _CANDIDATE_CAPS
    out = torch.empty(n, dtype=torch.long, device=device)
    full_lse = logits.logsumexp(dim=-1)
    k_eff = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))

    def cut(rows: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
        """The c most likely candidates of `rows`, and which survive top-k, top-p and min-p."""
        vals, idx = logits[rows].topk(c, dim=-1)  # sorted, most likely first
        keep = torch.arange(c, device=device).unsqueeze(0) < k_eff[rows].unsqueeze(1)
        k_inside = k_eff[rows] <= c
        # top-p is measured on the distribution renormalised over the top-k set (as HF and vLLM do).
        norm = torch.where(k_inside, vals.masked_fill(~keep, float("-inf")).logsumexp(dim=-1), full_lse[rows])
        probs = (vals - norm.unsqueeze(1)).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        keep &= mass_before < top_p[rows].unsqueeze(1)
        keep &= probs >= min_p[rows].unsqueeze(1) * probs[:, :1]
        keep[:, 0] = True  # the most likely token always survives
        return vals, idx, keep, probs, k_inside

    def pick(rows: torch.Tensor, vals, idx, keep, probs) -> None:
        weights = probs
        if temperature_after is not None:  # the survivors, tempered
            weights = ((vals - vals[:, :1]) / temperature_after[rows].unsqueeze(1)).exp()
        picked = inverse_cdf(weights * keep, u[rows])
        out[rows] = idx.gather(1, picked.unsqueeze(1)).squeeze(1)

    pending = torch.arange(n, device=device)
    for cap in caps:
        c = vocab if cap is None else min(cap, vocab)
        if c == vocab:  # every row is decided here, with no selection by device values (no host sync)
            for rows in pending.split(max(1, n * _PLANNED_BYTES // _SINGLE_PASS_BYTES)):
                pick(rows, *cut(rows, c)[:4])  # one chunk's tensors alive at a time
            break
        vals, idx, keep, probs, k_inside = cut(pending, c)
        # A cut inside the candidates is final unless top-p must be measured on a top-k set that reaches
        # past them (its mass, the normaliser, is then not known yet).
        k_off = k_eff[pending] == vocab
        done = k_inside | (~keep[:, -1] & (k_off | (top_p[pending] >= 1)))
        if done.any():
            pick(pending[done], vals[done], idx[done], keep[done], probs[done])
        pending = pending[~done]
        del vals, idx, keep, probs  # before the next, larger pass
        if len(pending) == 0:
            break
    return out


@dataclass(slots=True)
class SampledBatch:
    """One step's samples where the logits were (on a GPU: the device), before the host has them.

    `start_copy` queues the copy to the host right after sampling; `result` waits for that copy only. With
    async scheduling the next step's kernels are queued in between, and `tokens` (still on the device)
    feeds that step's input ids, so the host learns a step's tokens while the next one runs."""

    tokens: torch.Tensor  # [rows] int64
    want_logprobs: list[int | None]
    # Rows that asked for logprobs (in order), on the device: the sampled token's logprob and rank, and the
    # top-n alternatives (n = the largest asked for; each row keeps its own n).
    logprob_rows: list[int]
    sampled_logprob: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    _host: tuple[torch.Tensor | None, ...] | None = None
    _event: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Queue the device-to-host copy of everything `result` reads (pinned, no sync on a GPU)."""
        parts = (self.tokens, self.sampled_logprob, self.rank, self.top_values, self.top_ids)
        if self.tokens.device.type != "cuda":
            self._host = parts
            return
        self._host = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in parts)
        self._event = torch.cuda.Event()
        self._event.record()

    def result(self) -> SampleResult:
        """The samples on the host (waits for the copy, not for work queued after it)."""
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        tokens, lp, rank, top_v, top_i = self._host
        token_list = tokens.tolist()
        n = len(token_list)
        lp_out: list[dict[int, Logprob] | None] = [None] * n
        sampled_lp: list[float | None] = [None] * n
        if self.logprob_rows:
            lps, ranks = lp.tolist(), rank.tolist()
            vals, ids = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(self.logprob_rows):
                tok = token_list[i]
                entry = {tok: Logprob(lps[j], ranks[j])}
                k = self.want_logprobs[i]
                for r, (v, t) in enumerate(zip(vals[j][:k], ids[j][:k]), start=1):
                    entry.setdefault(t, Logprob(v, r))
                lp_out[i] = entry
                sampled_lp[i] = lps[j]
        return SampleResult(token_list, lp_out, sampled_lp)


def draw_uniform(generator: torch.Generator) -> torch.Tensor:
    """A seeded request's one draw for one sampled row (speculation replays these: speculation/verify.py)."""
    return torch.rand((), generator=generator, dtype=torch.float64)


def _plain_greedy(request: Request) -> bool:
    """Whether a row wants the argmax of its raw logits: greedy, with no penalty, bias, min_tokens ban,
    banned string, DRY, grammar or logprobs (what `Sampler.sample` would apply before its argmax)."""
    p = request.params
    return (
        p.greedy
        and request.constraint is None
        and p.logprobs is None
        and not p.banned_strings
        and not p.dry_multiplier
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and not p.logit_bias
        and not (p.min_tokens and request.num_output_tokens + request.num_output_placeholders < p.min_tokens)
    )


class Sampler:
    """Turns the logits of sampled rows into next tokens."""

    def __init__(self, eos_token_ids: list[int], seed: int = 0, breakers: BreakerTable | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)
        self.breakers = breakers  # DRY's sequence breakers in this vocabulary (none without a tokenizer)
        self.masks = GrammarMasks()  # structured output's token masks

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        return self.sample(logits, requests).result()

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledBatch:
        """Sample every row where the logits are; nothing here waits for the device."""
        if all(_plain_greedy(r) for r in requests):
            # Nothing but the argmax asked for (the usual batch-1 greedy decode): one op, on the logits as
            # they are (a float32 copy would hold the same order).
            return SampledBatch(logits.argmax(dim=-1), [None] * len(requests), [])
        logits = logits.float()
        n = len(requests)
        device = logits.device
        want_logprobs = [r.params.logprobs for r in requests]
        logprob_rows = [i for i, k in enumerate(want_logprobs) if k is not None]
        raw_logprobs = lp_index = None
        if logprob_rows:  # a device index: a list index would copy (and sync) from pageable memory
            lp_index = to_device(logprob_rows, torch.long, device)
            raw_logprobs = logits.index_select(0, lp_index).log_softmax(dim=-1)

        constrained = GrammarMasks.rows(requests)
        before_bans = None
        if any(requests[i].banned is not None or requests[i].params.min_tokens for i in constrained):
            # kept for rows the bans below (the only -inf they write) would leave no token the grammar allows
            before_bans = logits.index_select(0, to_device(constrained, torch.long, device))
        chain = [not r.params.greedy and r.params.needs_chain for r in requests]
        apply_penalties(logits, requests, chain)
        apply_bias_and_min_tokens(logits, requests, self.eos_token_ids)
        apply_bans(logits, requests)  # banned strings: tokens that began a banned phrase at this position
        apply_dry(logits, requests, self.breakers)
        if constrained:  # structured output: the grammar's token masks, last
            apply_constraints(self.masks, logits, requests, before_bans)

        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        rand = [i for i, r in enumerate(requests) if not r.params.greedy]
        if len(greedy) == n:
            tokens = logits.argmax(dim=-1)
        elif len(rand) == n:  # the common case: no fancy-index copy of the logits
            tokens = self._sample_random(logits, requests)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=device)
            g, r = to_device(greedy, torch.long, device), to_device(rand, torch.long, device)
            tokens[g] = logits.index_select(0, g).argmax(dim=-1)
            tokens[r] = self._sample_random(logits.index_select(0, r), [requests[i] for i in rand])

        batch = SampledBatch(tokens, want_logprobs, logprob_rows)
        if raw_logprobs is not None:
            picked = tokens.index_select(0, lp_index).unsqueeze(1)
            lp = raw_logprobs.gather(1, picked)
            batch.sampled_logprob = lp.squeeze(1)
            batch.rank = (raw_logprobs > lp).sum(dim=1) + 1
            k = max(want_logprobs[i] for i in logprob_rows)
            batch.top_values, batch.top_ids = raw_logprobs.topk(k, dim=-1)
        return batch

    def _uniforms(self, requests: list[Request]) -> torch.Tensor:
        """One uniform per row; a seeded request draws from its own stream, so its samples do not depend
        on which other requests share the batch."""
        u = torch.rand(len(requests), generator=self.generator, dtype=torch.float64)
        for i, r in enumerate(requests):
            if r.generator is not None:
                u[i] = draw_uniform(r.generator)
        return u

    def _xtc_rolls(self, requests: list[Request]) -> torch.Tensor:
        """XTC's roll per row, drawn before the row's sampling uniform from the same stream (0 where XTC
        is off, so no stream moves)."""
        u = torch.zeros(len(requests), dtype=torch.float64)
        for i, r in enumerate(requests):
            if r.params.xtc_on:
                gen = r.generator if r.generator is not None else self.generator
                u[i] = torch.rand((), generator=gen, dtype=torch.float64)
        return u

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        chain = [i for i, r in enumerate(requests) if r.params.needs_chain]
        if not chain:
            return self._sample_fast(logits, requests)
        device = logits.device
        out = torch.empty(len(requests), dtype=torch.long, device=device)
        in_chain = set(chain)
        fast = [i for i in range(len(requests)) if i not in in_chain]
        if fast:
            rows = to_device(fast, torch.long, device)
            out[rows] = self._sample_fast(logits.index_select(0, rows), [requests[i] for i in fast])
        rows = to_device(chain, torch.long, device)
        reqs = [requests[i] for i in chain]
        rolls = to_device(self._xtc_rolls(reqs), torch.float64, device)
        u = to_device(self._uniforms(reqs), torch.float64, device)
        sub = logits if len(chain) == len(requests) else logits.index_select(0, rows)
        vocab = logits.shape[-1]
        out[rows] = sample_chain(sub, reqs, u, rolls, lambda rs: penalty_terms(rs, vocab, device))
        return out

    def _sample_fast(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        # A top_k past the vocabulary keeps every token: off, as in vLLM (validation bounds it to int64).
        top_ks = [k if (k := r.params.top_k) < vocab else 0 for r in requests]
        cuts = [
            k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for k, r in zip(top_ks, requests, strict=True)
        ]
        trunc = [i for i, cut in enumerate(cuts) if cut]
        plain = [i for i, cut in enumerate(cuts) if not cut]
        temps = to_device([r.params.temperature for r in requests], logits.dtype, device)
        # Temperature-last rows are cut on the untempered logits; the survivors are tempered after.
        after_list = [
            r.params.temperature if cut and r.params.temperature_last else 1.0
            for r, cut in zip(requests, cuts)
        ]
        after = to_device(after_list, logits.dtype, device)
        logits = logits / (temps / after).unsqueeze(1)
        u = to_device(self._uniforms(requests), torch.float64, device)
        if not trunc:  # inverse CDF needs no sort: any fixed token order gives the same distribution
            return inverse_cdf(logits.softmax(dim=-1), u.to(logits.dtype))
        out = torch.empty(len(requests), dtype=torch.long, device=device)
        if plain:
            rows = to_device(plain, torch.long, device)
            out[rows] = inverse_cdf(logits.index_select(0, rows).softmax(dim=-1), u[rows].to(logits.dtype))
        sub = [requests[i] for i in trunc]
        rows = to_device(trunc, torch.long, device)
        out[rows] = sample_truncated(
            logits if len(trunc) == len(requests) else logits.index_select(0, rows),
            to_device([top_ks[i] for i in trunc], torch.long, device),
            to_device([r.params.top_p for r in sub], logits.dtype, device),
            to_device([r.params.min_p for r in sub], logits.dtype, device),
            u[rows].to(logits.dtype),
            None if all(a == 1.0 for a in after_list) else after[rows],
        )
        return out
