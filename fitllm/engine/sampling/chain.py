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
    device = logits.device
    out = torch.empty(len(requests), dtype=torch.long, device=device)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        p = r.params
        key = ("mirostat",) if p.mirostat in (1, 2) else order_of(p)
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        index = to_device(rows, torch.long, device)
        sub = logits if len(rows) == len(requests) else logits.index_select(0, index)
        reqs = [requests[i] for i in rows]
        out[index] = _run(sub, reqs, key, u[index], xtc_roll[index], penalty_terms)
    return out


def _run(
    logits: torch.Tensor,
    reqs: list[Request],
    order: tuple[str, ...],
    u: torch.Tensor,
    roll: torch.Tensor,
    penalty_terms: PenaltyTerms,
) -> torch.Tensor:
    device = logits.device
    table = to_device([[float(getattr(r.params, n)) for n in _PARAMS] for r in reqs], torch.float32, device)
    col = {n: table[:, j : j + 1] for j, n in enumerate(_PARAMS)}
    vals, ids = logits.topk(min(PREFILTER, logits.shape[-1]), dim=-1)
    terms = penalty_terms(reqs) if "repetition_penalty" in order or order == ("mirostat",) else None

    def temper(v: torch.Tensor, i: torch.Tensor, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros_like(col["temperature"])
        return stages.temperature(
            v, i, col["temperature"], col["dynatemp_range"] if dynamic else zero, col["dynatemp_exponent"],
            col["smoothing_factor"], col["smoothing_curve"], col["top_n_sigma"] if dynamic else zero,
        )  # fmt: skip

    if order == ("mirostat",):
        if terms is not None:
            vals, ids = stages.penalties(vals, ids, *terms)
        vals, ids = temper(vals, ids, dynamic=False)
        mu = _mirostat_mu(reqs, col["mirostat_tau"])
        token, new_mu = mirostat(
            vals, ids, col["mirostat"], col["mirostat_tau"], col["mirostat_eta"], mu, logits.shape[-1], u
        )
        for j, r in enumerate(reqs):
            state_of(r).mirostat_mu = new_mu[j]
        return token
    for name in order:
        if name == "repetition_penalty" and terms is not None:
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
            vals, ids = temper(vals, ids, dynamic=True)
    if any(r.params.xtc_on for r in reqs):
        vals = stages.xtc(vals, col["xtc_threshold"], _xtc_rolled(roll, reqs, device))
    pick = inverse_cdf(vals.softmax(-1), u)
    return ids.gather(1, pick.unsqueeze(1)).squeeze(1)


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
