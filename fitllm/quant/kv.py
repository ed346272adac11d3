"""KV cache dtypes (`--kv-cache-dtype`): bytes per token as stored.

`auto` keeps K and V in the model dtype. `int8` and `fp8` (e4m3) store one byte per element plus one
float32 scale per token, layer, K/V and KV head, so the figure the planner reports is the one the pool
allocates.
"""

from __future__ import annotations

import torch

from fitllm.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
SCALE_BYTES = 4  # one float32 scale per (token, layer, K/V, kv head)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's K and V take across all layers."""
    if kv_cache_dtype == "auto":
        return config.kv_bytes_per_token(dtype)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}"
        )
    vectors = config.num_hidden_layers * 2 * config.num_key_value_heads
    return vectors * (config.head_dim + SCALE_BYTES)
