"""fitllm bounds how long GNU OpenMP's idle threads spin before they sleep (fitllm/openmp.py), before torch
loads it, unless the user said otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from fitllm.openmp import SPIN_COUNT, bound_spin_wait

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_bounded_spin_unless_the_environment_says_how_to_wait():
    env: dict[str, str] = {}
    bound_spin_wait(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT} and int(SPIN_COUNT) < 300_000  # below libgomp's default
    for own in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "100000"}):
        env = dict(own)
        bound_spin_wait(env)
        assert env == own


def test_set_before_torch_is_loaded_on_import():
    # An import hook prints the policy at the moment torch (and with it libgomp) is first imported.
    probe = (
        "import os, sys\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print('torch', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import fitllm\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "None", SPIN_COUNT]
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "PASSIVE", "None"]
