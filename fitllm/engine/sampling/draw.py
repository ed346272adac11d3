"""Drawing one index per row from unnormalised weights (shared by the fast path and the sampler chain)."""

from __future__ import annotations

import torch


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised `weights` with one uniform number per row."""
    cdf = weights.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=weights.shape[-1] - 1)
