"""The chain's stages, each KoboldCpp's function of the same name (gpttype_adapter.cpp) on a batch of rows.

A batch is `vals` [rows, C]: each row's candidates sorted by value, most likely first, a removed candidate
-inf (so removed ones sit at the end and a row's "size" is its finite count). Per-row parameters are [rows,
1] tensors; a row whose parameter turns a stage off is left as it was. KoboldCpp's "subtract 999" (XTC,
top-n-sigma) is kept as it is: such a token keeps its place in the size but gets no probability.
"""

from __future__ import annotations

import torch

NEG = 999.0  # what KoboldCpp subtracts to silence a token without removing it
GREEDY_TEMP = 1 / 256  # KoboldCpp's stand-in for temperature 0 (then only the first candidate is kept)


def size_of(vals: torch.Tensor) -> torch.Tensor:
    """[rows, 1] candidates left in each row."""
    return torch.isfinite(vals).sum(-1, keepdim=True)


def _cols(vals: torch.Tensor) -> torch.Tensor:
    return torch.arange(vals.shape[-1], device=vals.device).unsqueeze(0)


def _cut(vals: torch.Tensor, keep: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    return vals.masked_fill(~keep & on, float("-inf"))


def resort(vals: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted again after a stage that can reorder candidates (penalties, typical, smoothing)."""
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    return vals, ids.gather(1, perm)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """[rows, 1] Shannon entropy (nats) of each row's probabilities, 0 * log 0 taken as 0."""
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1, keepdim=True)


def top_k(vals: torch.Tensor, k: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Keep the k most likely (k <= 0: all). KoboldCpp skips it when min_p and nsigma are both on."""
    kk = torch.where(k <= 0, size_of(vals), k).clamp(min=1)
    return _cut(vals, _cols(vals) < kk, ~skip)


def top_a(vals: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Remove tokens with probability below a * max_probability ** 2 (the first always stays)."""
    p = vals.softmax(-1)
    keep = (p >= a * p[:, :1] ** 2) | (_cols(vals) == 0)
    return _cut(vals, keep, a > 0)


def top_p_min_p(vals: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Nucleus (the smallest prefix whose mass reaches top_p), then min-p (probability at least min_p times
    the first's), as KoboldCpp's KCPP_SAMPLER_TOP_P runs both."""
    p = vals.softmax(-1)
    before = torch.cat([torch.zeros_like(p[:, :1]), p.cumsum(-1)[:, :-1]], dim=-1)
    vals = _cut(vals, before < top_p, top_p < 1)
    floor = vals[:, :1] + min_p.clamp(min=1e-30).log()
    return _cut(vals, (vals >= floor) | (_cols(vals) == 0), min_p > 0)


def tail_free(vals: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Tail-free sampling: cut where the normalised |second derivative| of the sorted probabilities has
    summed past z (KoboldCpp's sample_tail_free, min_keep 1)."""
    c = vals.shape[-1]
    if c < 3:
        return vals
    size = size_of(vals)
    p = vals.softmax(-1)
    d2 = ((p[:, :-2] - p[:, 1:-1]) - (p[:, 1:-1] - p[:, 2:])).abs()
    idx = _cols(d2)
    valid = idx < size - 2
    d2 = d2 * valid
    total = d2.sum(-1, keepdim=True)
    uniform = valid.to(p.dtype) / (size - 2).clamp(min=1)
    d2 = torch.where(total > 1e-6, d2 / total.clamp(min=1e-30), uniform)
    over = (d2.cumsum(-1) > z) & (idx >= 1) & valid
    last = torch.where(over.any(-1, keepdim=True), over.int().argmax(-1, keepdim=True), size)
    return _cut(vals, _cols(vals) < last, (z < 1) & (size > 2))


def typical(vals: torch.Tensor, ids: torch.Tensor, typ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy until their mass
    passes typ (KoboldCpp's sampler_typical, min_keep 1)."""
    p = vals.softmax(-1)
    score = torch.where(p > 0, (-p.log() - entropy(p)).abs(), torch.full_like(p, float("inf")))
    order = score.argsort(dim=-1, stable=True)
    over = p.gather(1, order).cumsum(-1) > typ
    last = torch.where(over.any(-1, keepdim=True), over.int().argmax(-1, keepdim=True) + 1, size_of(vals))
    keep = torch.zeros_like(over).scatter(1, order, _cols(vals) < last)
    return resort(_cut(vals, keep, typ < 1), ids)


def smooth(vals: torch.Tensor, factor: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """Quadratic sampling around the top logit h: -(k f d^2) + (s f d^3) + h, d = logit - h, k = (3 - curve)
    / 2, s = (curve - 1) / 2 (curve 1, KoboldCpp's: -f d^2 + h)."""
    h = vals[:, :1]
    d = vals - h
    k, s = (3 - curve) / 2, (curve - 1) / 2
    out = -(k * factor * d * d) + (s * factor * d * d * d) + h
    return torch.where(torch.isfinite(vals), out, vals)


def temperature(
    vals: torch.Tensor,
    ids: torch.Tensor,
    temp: torch.Tensor,
    dyn_range: torch.Tensor,
    dyn_exp: torch.Tensor,
    smoothing: torch.Tensor,
    curve: torch.Tensor,
    nsigma: torch.Tensor,
    any_smoothing: bool = True,
    any_nsigma: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KCPP_SAMPLER_TEMP: dynamic temperature (from the normalised entropy, in [temp - range, temp + range]
    clamped at 0) or plain temperature (<= 0: keep the first only), then smoothing, then top-n-sigma
    (tokens more than nsigma standard deviations below the top are silenced). any_smoothing / any_nsigma: whether
    some row has them on, known on the host (asking the device would wait for it)."""
    size = size_of(vals)
    dyn = dyn_range != 0
    lo, hi = (temp - dyn_range).clamp(min=0), (temp + dyn_range).clamp(min=0)
    p = vals.softmax(-1)
    norm_h = entropy(p) / size.clamp(min=2).to(p.dtype).log()
    # KoboldCpp would divide by 0 where the range reaches 0 and the row is certain; its greedy stand-in here
    dyn_t = (lo + (hi - lo) * norm_h.pow(dyn_exp.clamp(min=0))).clamp(min=GREEDY_TEMP)
    greedy = ~dyn & (temp <= 0)
    t = torch.where(dyn, dyn_t, torch.where(greedy, torch.full_like(temp, GREEDY_TEMP), temp))
    moves = ~dyn | (size > 1)  # sample_entropy leaves a single candidate alone
    out = torch.where(moves, vals / t, vals)
    smoothed = (smoothing > 0) & (size > 1) & ~greedy
    if any_smoothing:
        out = torch.where(smoothed, smooth(out, smoothing, curve), out)
        out, ids = resort(out, ids)
    out = _cut(out, _cols(out) == 0, greedy)
    if any_nsigma:
        alive = torch.isfinite(out)
        count = alive.sum(-1, keepdim=True).clamp(min=1)
        mean = torch.where(alive, out, 0).sum(-1, keepdim=True) / count
        std = (torch.where(alive, (out - mean) ** 2, 0).sum(-1, keepdim=True) / count).sqrt()
        low = alive & (out < out[:, :1] - nsigma * std)
        out = torch.where(low & (nsigma > 0) & (size > 1), out - NEG, out)
    return out, ids


def penalties(
    vals: torch.Tensor, ids: torch.Tensor, factor: torch.Tensor, subtract: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KCPP_SAMPLER_REP_PEN on the candidates as they are now: a positive value divided by its factor, any
    other multiplied, then the additive penalties subtracted (factor 1 and 0 where a token is not seen)."""
    f, s = factor.gather(1, ids), subtract.gather(1, ids)
    out = torch.where(vals > 0, vals / f, vals * f) - s
    return resort(torch.where(torch.isfinite(vals), out, vals), ids)


def xtc(vals: torch.Tensor, threshold: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Exclude Top Choices: of the tokens with probability >= threshold, all but the least likely are
    silenced; `on` holds each row's roll (KoboldCpp: only with 2 or more such tokens)."""
    p = vals.softmax(-1)
    above = (p >= threshold).int().cumprod(-1)
    m = above.sum(-1, keepdim=True)
    silence = (_cols(vals) < m - 1) & (m > 1) & on & (size_of(vals) > 1)
    return torch.where(silence, vals - NEG, vals)
