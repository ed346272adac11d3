"""How fitllm's CPU threads wait for each other: GNU OpenMP told to spin briefly, then sleep, before torch loads it.

PyTorch's CPU wheels run their parallel regions on libgomp, whose idle threads spin (GOMP_SPINCOUNT, 300,000
`pause`s by default) before they sleep. A decode step is hundreds of short parallel regions, so how a thread
waits decides its speed:
- Sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every region wake a thread through the kernel: batch-1 int4
  decode of the default model, 2 threads, quiet machine, ran at 34 tok/s against 72 with libgomp's default spin
  and 80 with GOMP_SPINCOUNT=30000 (`fitllm bench quant --configs int4 --batches 1 --threads 2 --greedy`,
  docs/benchmarks.md, session 12).
- Spinning long is ruinous where there are more runnable threads than cores (a machine shared with other
  work): a spinning thread holds a core while the thread it waits for cannot run, and each region costs a
  scheduler time slice (at load 14 on 2 cores one [512, 576] bfloat16 matmul took 28 ms with the default spin,
  0.08 ms passive).
So fitllm bounds the spin at SPIN_COUNT, a tenth of libgomp's default: the fastest measured on a quiet machine.
It still loses under contention (two busy loops on the 2 cores: 8-30 tok/s against 47 passive), which is why
a user's setting wins and the README says to sleep on shared machines. libgomp reads this once, when it
is loaded, so it runs before `import torch` (fitllm/__init__.py); where torch was imported first it changes
nothing. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (`OMP_WAIT_POLICY=PASSIVE` on a machine shared
with other busy work).
"""

from __future__ import annotations

import os

SPIN_COUNT = "30000"
# What this module set, so that peers a benchmark starts (llama.cpp) can be given the user's own environment.
SET_BY_FITLLM: dict[str, str] = {}


def bound_spin_wait(environ: dict[str, str] | None = None) -> None:
    """GOMP_SPINCOUNT=SPIN_COUNT unless the environment already says how OpenMP threads wait."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    SET_BY_FITLLM["GOMP_SPINCOUNT"] = SPIN_COUNT
