"""The ordered sampler chain: KoboldCpp's SampleLogits, batched on the device, for the rows whose requests
ask for an order or a writers' sampler (SamplingParams.needs_chain).

As KoboldCpp: (logit bias and DRY are already in the logits) the 3000 most likely tokens are kept; then
either mirostat (repetition penalties, temperature with smoothing, mirostat v1 / v2), or each sampler of
the request's order in turn (one missing from the order is not applied), XTC last, and a draw. Rows are
batched by order; parameters go to the device in one copy per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampling import stages
from fitllm.engine.sampling.draw import inverse_cdf
from fitllm.engine.sampling.mirostat import mirostat
from fitllm.engine.sampling.state import state_of
from fitllm.memory.transfer import to_device

PREFILTER = 3000  # KoboldCpp's "prefilter to top 3k tokens"
# (factor, subtract) [rows, vocab] of the repetition penalties for these requests, or None if none has one.
PenaltyTerms = Callable[[list[Request]], tuple[torch.Tensor, torch.Tensor] | None]

_PARAMS = (
    "temperature", "top_k", "top_a", "top_p", "min_p", "tfs", "typical_p", "dynatemp_range",
    "dynatemp_exponent", "smoothing_factor", "smoothing_curve", "top_n_sigma", "xtc_threshold",
    "mirostat", "mirostat_tau", "mirostat_eta",
)  # fmt: skip


def order_of(p: SamplingParams) -> tuple[str, ...]:
    """The request's order; without one, penalties first and temperature first (last with
    temperature_last), as the fast path runs them."""
    if p.sampler_order is not None:
        return tuple(p.sampler_order)
    cuts = ("top_k", "top_a", "top_p", "tfs", "typical_p")
    if p.temperature_last:
        return ("repetition_penalty", *cuts, "temperature")
    return ("repetition_penalty", "temperature", *cuts)


def sample_chain(
    logits: torch.Tensor,
    requests: list[Request],
    u: torch.Tensor,
    xtc_roll: torch.Tensor,
    penalty_terms: PenaltyTerms,
) -> torch.Tensor:
    """Next token per row; `u` and `xtc_roll`: one uniform each per row, on the device."""
    out = torch.empty(len(requests), dtype=torch.long, device=logits.device)
    for index, sub, reqs, order in _groups(logits, requests):
        out[index] = _run(sub, reqs, order, u[index], xtc_roll[index], penalty_terms)
    return out


def chain_distribution(
    logits: torch.Tensor, requests: list[Request], xtc_roll: torch.Tensor, penalty_terms: PenaltyTerms
) -> torch.Tensor:
    """[rows, vocab] the probabilities each row is drawn from (not for mirostat rows, whose cut depends on
    mu): what the tests compare with reference tables."""
    out = torch.zeros_like(logits)
    for index, sub, reqs, order in _groups(logits, requests):
        vals, ids = _cut(sub, reqs, order, xtc_roll[index], penalty_terms)
        out[index] = torch.zeros_like(sub).scatter(1, ids, vals.softmax(-1))
    return out


def _groups(logits: torch.Tensor, requests: list[Request]):
    """(row index on the device, their logits, their requests, their order) per order."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        p = r.params
        key = ("mirostat",) if p.mirostat in (1, 2) else order_of(p)
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        index = to_device(rows, torch.long, logits.device)
        sub = logits if len(rows) == len(requests) else logits.index_select(0, index)
        yield index, sub, [requests[i] for i in rows], key


def _run(
    logits: torch.Tensor,
    reqs: list[Request],
    order: tuple[str, ...],
    u: torch.Tensor,
    roll: torch.Tensor,
    penalty_terms: PenaltyTerms,
) -> torch.Tensor:
    if order == ("mirostat",):
        return _mirostat(logits, reqs, u, penalty_terms)
    vals, ids = _cut(logits, reqs, order, roll, penalty_terms)
    pick = inverse_cdf(vals.softmax(-1), u)
    return ids.gather(1, pick.unsqueeze(1)).squeeze(1)


def _columns(reqs: list[Request], device: torch.device) -> dict[str, torch.Tensor]:
    """Each parameter as a [rows, 1] column, the whole table in one copy."""
    # top_k may be any int64 (past the vocabulary: off); float32 holds 2**24 exactly
    rows = [[float(min(getattr(r.params, n), 1 << 24)) for n in _PARAMS] for r in reqs]
    table = to_device(rows, torch.float32, device)
    return {n: table[:, j : j + 1] for j, n in enumerate(_PARAMS)}


def _temper(vals, ids, col, reqs: list[Request], dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KCPP_SAMPLER_TEMP; without `dynamic` (mirostat's branch) plain temperature and smoothing only."""
    zero = torch.zeros_like(col["temperature"])
    return stages.temperature(
        vals, ids, col["temperature"], col["dynatemp_range"] if dynamic else zero, col["dynatemp_exponent"],
        col["smoothing_factor"], col["smoothing_curve"], col["top_n_sigma"] if dynamic else zero,
        any(r.params.smoothing_factor > 0 for r in reqs), dynamic and any(r.params.top_n_sigma > 0 for r in reqs),
    )  # fmt: skip


def _mirostat(logits: torch.Tensor, reqs: list[Request], u: torch.Tensor, penalty_terms: PenaltyTerms):
    col = _columns(reqs, logits.device)
    vals, ids = logits.topk(min(PREFILTER, logits.shape[-1]), dim=-1)
    terms = penalty_terms(reqs)
    if terms is not None:
        vals, ids = stages.penalties(vals, ids, *terms)
    vals, ids = _temper(vals, ids, col, reqs, dynamic=False)
    mu = _mirostat_mu(reqs, col["mirostat_tau"])
    token, new_mu = mirostat(
        vals, ids, col["mirostat"], col["mirostat_tau"], col["mirostat_eta"], mu, logits.shape[-1], u
    )
    for j, r in enumerate(reqs):
        state_of(r).mirostat_mu = new_mu[j, 0]
    return token


def _cut(
    logits: torch.Tensor,
    reqs: list[Request],
    order: tuple[str, ...],
    roll: torch.Tensor,
    penalty_terms: PenaltyTerms,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates after every sampler of the order and XTC: (values, token ids), sorted."""
    device = logits.device
    col = _columns(reqs, device)
    vals, ids = logits.topk(min(PREFILTER, logits.shape[-1]), dim=-1)
    terms = penalty_terms(reqs) if "repetition_penalty" in order else None
    ps = [r.params for r in reqs]
    used = {  # a stage no row of the batch turns on is not run (each would be a no-op)
        "repetition_penalty": terms is not None,
        "top_k": any(p.top_k > 0 for p in ps),
        "top_a": any(p.top_a > 0 for p in ps),
        "top_p": any(p.top_p < 1 or p.min_p > 0 for p in ps),
        "tfs": any(p.tfs < 1 for p in ps),
        "typical_p": any(p.typical_p < 1 for p in ps),
        "temperature": True,
    }
    for name in order:
        if not used[name]:
            continue
        if name == "repetition_penalty":
            vals, ids = stages.penalties(vals, ids, *terms)
        elif name == "top_k":
            skip = (col["min_p"] > 0) & (col["top_n_sigma"] > 0)
            vals = stages.top_k(vals, col["top_k"].long(), skip)
        elif name == "top_a":
            vals = stages.top_a(vals, col["top_a"])
        elif name == "top_p":
            vals = stages.top_p_min_p(vals, col["top_p"], col["min_p"])
        elif name == "tfs":
            vals = stages.tail_free(vals, col["tfs"])
        elif name == "typical_p":
            vals, ids = stages.typical(vals, ids, col["typical_p"])
        elif name == "temperature":
            vals, ids = _temper(vals, ids, col, reqs, dynamic=True)
    if any(r.params.xtc_on for r in reqs):
        vals = stages.xtc(vals, col["xtc_threshold"], _xtc_rolled(roll, reqs, device))
    return vals, ids


def _xtc_rolled(roll: torch.Tensor, reqs: list[Request], device: torch.device) -> torch.Tensor:
    """[rows, 1]: whether each row's XTC fires this step (roll < probability, and XTC on)."""
    prob = to_device(
        [r.params.xtc_probability if r.params.xtc_on else -1.0 for r in reqs], roll.dtype, device
    )
    return (roll < prob).unsqueeze(1)


def _mirostat_mu(reqs: list[Request], tau: torch.Tensor) -> torch.Tensor:
    """[rows, 1] each request's mu, 2 * tau at its first step."""
    mus = [state_of(r).mirostat_mu for r in reqs]
    if all(m is None for m in mus):
        return 2 * tau
    start = (2 * tau).squeeze(1)
    return torch.stack([start[j] if m is None else m for j, m in enumerate(mus)]).unsqueeze(1)
