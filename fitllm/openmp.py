"""How fitllm's CPU threads wait for each other: GNU OpenMP told to sleep, not spin, before torch loads it.

PyTorch's CPU wheels run their parallel regions on libgomp, whose idle threads spin (GOMP_SPINCOUNT, 300,000
`pause`s by default, milliseconds on recent Intel cores) before they sleep. A prefill or decode step is hundreds
of short parallel regions. On a machine with more runnable threads than cores (the shared 2-core machines this
project runs on, or any server beside other work), a spinning thread holds a core while the thread it waits for
cannot run, so every region costs a scheduler time slice: at 2 threads and a load average of 14, one [512, 576]
bfloat16 multiply took 28 ms by default and 0.08 ms with OMP_WAIT_POLICY=PASSIVE; a 512-token int4 prefill ran
at ~20 tok/s vs ~140, batch-1 decode at ~1 vs ~30 (notes: /work/notes/benchcpu.md). libgomp reads the policy
once, when it is loaded, so this runs before `import torch` (fitllm/__init__.py); where torch was imported
first it changes nothing. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (`OMP_WAIT_POLICY=ACTIVE` for a
machine whose cores are fitllm's alone).
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"
# What this module set, so that peers a benchmark starts (llama.cpp) can be given the user's own environment.
SET_BY_FITLLM: dict[str, str] = {}


def prefer_passive_wait(environ: dict[str, str] | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment already says how OpenMP threads wait."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    env["OMP_WAIT_POLICY"] = WAIT_POLICY
    SET_BY_FITLLM["OMP_WAIT_POLICY"] = WAIT_POLICY
