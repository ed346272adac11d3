"""oneDNN's primitive caches bounded, before torch loads it.

PyTorch's CPU bfloat16 matmuls and bmms run on oneDNN, which JIT-compiles a primitive per shape and keeps it
in two LRU caches of 1024 entries each (oneDNN's own, ONEDNN_PRIMITIVE_CACHE_CAPACITY, and ideep's,
LRU_CACHE_CAPACITY). A server's decode attention is a bfloat16 bmm over the batch's longest context, a new
shape nearly every step, so both caches fill with primitives used once: measured ~1.1 MiB of RSS per new
context (100 contexts: +111 MiB), 2.1 MiB per step of the 8-client serve load, growing until 2 x 1024
entries (a GiB or more). 64 entries bound it at ~31 MiB (300 new contexts: +31 MiB, against +330 with the
defaults) and keep a step's reuse: a step of 32 requests in several decode groups, with a prefill chunk
beside them, uses ~20 shapes; at 16 entries such steps recompiled (`none`, 32 requests: mean step 329-349 ms
against 197-222 at 64 and 209-213 at 1024). (0 is not an option: ideep crashes with LRU_CACHE_CAPACITY=0.)
A user's own setting wins.
"""

from __future__ import annotations

import os

from fitllm.openmp import SET_BY_FITLLM

CACHE_CAPACITY = "64"
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_primitive_caches(environ: dict[str, str] | None = None) -> None:
    """Both cache capacities at CACHE_CAPACITY, each unless the environment already sets it."""
    env = os.environ if environ is None else environ
    for name in CACHE_VARIABLES:
        if name not in env:
            env[name] = CACHE_CAPACITY
            SET_BY_FITLLM[name] = CACHE_CAPACITY
