"""How a request's prompt K/V was had (RequestOutput.reuse), in the shape the responses carry it.

`cached_tokens` is every prompt token not prefilled: found in the prefix cache, shifted, or copied back from
the host tier (what vLLM and OpenAI report as `usage.prompt_tokens_details.cached_tokens`); the Kobold
routes and the studio also give each part.
"""

from __future__ import annotations

from fitllm.engine.request import CacheReuse


def reused_tokens(reuse: CacheReuse) -> int:
    """Prompt tokens whose K/V was not computed for this request."""
    return reuse.cached + reuse.shifted + reuse.from_host


def reuse_details(reuse: CacheReuse) -> dict[str, int]:
    """`prompt_tokens_details` of the Kobold responses and the studio's last event."""
    return {
        "cached_tokens": reused_tokens(reuse),
        "prefix_cached_tokens": reuse.cached,
        "shifted_tokens": reuse.shifted,
        "from_host_tokens": reuse.from_host,
        "prefilled_tokens": reuse.prefilled,
    }
