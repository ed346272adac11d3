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
It still loses under contention (two busy loops on the 2 cores: 8-30 tok/s against 47 passive), so where the
machine is already busy when fitllm starts (the 1-minute load average at least the CPUs this process may use:
other work would hold every core fitllm's threads need) its threads sleep at once instead
(OMP_WAIT_POLICY=PASSIVE). The rule is read once, at start: libgomp reads its settings once, when it is
loaded, so this runs before `import torch` (fitllm/__init__.py); where torch was imported first it changes
nothing. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
"""

from __future__ import annotations

import os

SPIN_COUNT = "30000"
# What this module set, so that peers a benchmark starts (llama.cpp) can be given the user's own environment.
SET_BY_FITLLM: dict[str, str] = {}


def busy_machine(load: float | None = None, cpus: int | None = None) -> bool:
    """Whether other work already keeps this process's CPUs busy: the 1-minute load average (`load`) at least
    the CPUs it may run on (`cpus`). Where the load is unknown, not busy."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return False
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return load >= cpus


def choose_wait_policy(environ: dict[str, str] | None = None, busy: bool | None = None) -> None:
    """Unless the environment already says how OpenMP threads wait: OMP_WAIT_POLICY=PASSIVE on a `busy`
    machine (default: `busy_machine()`), else GOMP_SPINCOUNT=SPIN_COUNT."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return
    key, value = (
        ("OMP_WAIT_POLICY", "PASSIVE")
        if (busy_machine() if busy is None else busy)
        else ("GOMP_SPINCOUNT", SPIN_COUNT)
    )
    env[key] = value
    SET_BY_FITLLM[key] = value
