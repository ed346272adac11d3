"""fitllm bounds oneDNN's primitive caches (fitllm/onednn.py), so a server whose decode bmm takes a new shape
every step does not keep a compiled primitive per context it has seen."""

from __future__ import annotations

import os
import subprocess
import sys

from fitllm.onednn import CACHE_CAPACITY, CACHE_VARIABLES, bound_primitive_caches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bounded_unless_the_environment_says_otherwise():
    env: dict[str, str] = {}
    bound_primitive_caches(env)
    assert env == dict.fromkeys(CACHE_VARIABLES, CACHE_CAPACITY) and 0 < int(CACHE_CAPACITY) < 1024
    own = {"LRU_CACHE_CAPACITY": "256"}
    env = dict(own)
    bound_primitive_caches(env)
    assert env["LRU_CACHE_CAPACITY"] == "256" and env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == CACHE_CAPACITY


_NEW_SHAPES = """
import ctypes, fitllm, torch
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) >> 10
torch.set_num_threads(2)
q = torch.randn(24, 3, 64, dtype=torch.bfloat16)
for ctx in range(200, 210):  # torch's and oneDNN's one-time set-up
    torch.bmm(q, torch.randn(24, ctx, 64, dtype=torch.bfloat16).transpose(1, 2))
before = rss()
for ctx in range(300, 600):  # a decode batch's bmms, one new context length per step
    k = torch.randn(24, ctx, 64, dtype=torch.bfloat16)
    torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), k)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(rss() - before)
"""


def test_new_bmm_shapes_do_not_pile_up_primitives():
    """300 new bfloat16 bmm shapes: measured +330 MiB of RSS with oneDNN's default caches (1024 entries each,
    growing to ~1.1 GiB), +31 MiB bounded at 64."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    proc = subprocess.run(
        [sys.executable, "-c", _NEW_SHAPES], capture_output=True, text=True, cwd=REPO, env=env, check=True
    )
    assert int(proc.stdout.strip().splitlines()[-1]) < 80
