"""Mirostat v1 and v2 (KoboldCpp's sample_token_mirostat / _v2) on a batch of sorted candidates, each row
with its own mu (on the device; updated from the token drawn: mu -= eta * (surprise - tau))."""

from __future__ import annotations

import math

import torch

from fitllm.engine.sampling.draw import inverse_cdf
from fitllm.engine.sampling.stages import size_of

MIROSTAT_M = 100  # tokens used to estimate the Zipf exponent (v1), as KoboldCpp


def mirostat(
    vals: torch.Tensor,
    ids: torch.Tensor,
    version: torch.Tensor,
    tau: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    n_vocab: int,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, new mu [rows, 1]). v1: top-k with k from the estimated Zipf exponent s_hat and mu;
    v2: keep the tokens whose surprise (-log2 p) is at most mu (at least one)."""
    rows, c = vals.shape
    cols = torch.arange(c, device=vals.device).unsqueeze(0)
    size = size_of(vals)
    logp = vals.log_softmax(-1)
    # v1: s_hat = sum(t_i b_i) / sum(t_i^2) over the first m - 1 pairs, t_i = log((i+2)/(i+1)),
    # b_i = log(p_i / p_(i+1)) (as a difference of log-probabilities: no division by an underflowed p).
    n = min(MIROSTAT_M - 1, c - 1)
    if n > 0:
        i = torch.arange(n, device=vals.device, dtype=vals.dtype).unsqueeze(0)
        t_i = torch.log((i + 2) / (i + 1))
        valid = i < (size - 1)
        b_i = torch.where(valid, logp[:, :n] - logp[:, 1 : n + 1], torch.zeros_like(t_i))
        s_hat = (t_i * b_i * valid).sum(-1, keepdim=True) / (t_i * t_i * valid).sum(-1, keepdim=True)
        eps = s_hat - 1
        k = ((eps * torch.pow(2.0, mu)) / (1 - torch.pow(float(n_vocab), -eps))).pow(1 / s_hat)
        k = torch.nan_to_num(k, nan=0.0, posinf=float(c), neginf=0.0).floor()
        k = torch.where(k <= 0, size.to(k.dtype), k).clamp(min=1)
        keep_v1 = cols < k
    else:
        keep_v1 = cols == 0
    surprise = -logp / math.log(2)
    keep_v2 = (surprise <= mu).int().cumprod(-1).bool() | (cols == 0)
    keep = torch.where(version == 1, keep_v1, keep_v2)
    vals = vals.masked_fill(~keep, float("-inf"))
    p = vals.softmax(-1)
    pick = inverse_cdf(p, u)
    token = ids.gather(1, pick.unsqueeze(1)).squeeze(1)
    observed = -torch.log2(p.gather(1, pick.unsqueeze(1)))
    return token, mu - eta * (observed - tau)
