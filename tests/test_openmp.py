"""fitllm bounds how long GNU OpenMP's idle threads spin before they sleep (fitllm/openmp.py), or has them sleep
at once on a machine already busy, before torch loads it, unless the user said otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from fitllm.openmp import SPIN_COUNT, busy_machine, choose_wait_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_bounded_spin_unless_the_environment_says_how_to_wait():
    env: dict[str, str] = {}
    choose_wait_policy(env, busy=False)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT} and int(SPIN_COUNT) < 300_000  # below libgomp's default
    env = {}
    choose_wait_policy(env, busy=True)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for own in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "100000"}):
        for busy in (True, False):
            env = dict(own)
            choose_wait_policy(env, busy=busy)
            assert env == own


def test_busy_means_the_load_fills_the_cpus():
    assert busy_machine(load=2.0, cpus=2) and busy_machine(load=9.5, cpus=4)
    assert not busy_machine(load=1.4, cpus=2) and not busy_machine(load=0.0, cpus=1)


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
        "print('chose', *fitllm.openmp.SET_BY_FITLLM.items())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    # Spin or sleep, as the machine's load decided in that process; torch saw the choice when it loaded.
    seen, chose = out.stdout.splitlines()
    assert (seen, chose) in (
        (f"torch None {SPIN_COUNT}", f"chose ('GOMP_SPINCOUNT', '{SPIN_COUNT}')"),
        ("torch PASSIVE None", "chose ('OMP_WAIT_POLICY', 'PASSIVE')"),
    )
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["torch PASSIVE None", "chose"]  # the user's setting: fitllm sets none
