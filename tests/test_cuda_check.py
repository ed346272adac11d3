"""An NVIDIA GPU that torch cannot use is reported loudly at start, with the install line (fitllm/cuda_check.py),
from fake driver files: the kernel module's version file, a device node, nvidia-smi on PATH."""

from __future__ import annotations

import logging

import pytest
import torch

from fitllm import cuda_check
from fitllm.config import EngineConfig
from fitllm.cuda_check import CUDA12_INSTALL, NvidiaEvidence, find_nvidia, unusable_gpu_message

PROC = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:23:56 UTC 2024\nGCC version:  gcc version 12.2.0\n"
)


def test_find_nvidia_reads_the_driver_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    none = find_nvidia(str(tmp_path / "no-proc"), str(tmp_path / "no-dev"))
    assert not none.present and none.driver is None and none.nvidia_smi is None
    (tmp_path / "version").write_text(PROC)
    assert find_nvidia(str(tmp_path / "version"), str(tmp_path / "no-dev")).driver == "550.54.15"
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug\n")
    assert find_nvidia(str(tmp_path / "version"), str(tmp_path / "no-dev")).driver == "535.104.05"
    (tmp_path / "nvidia0").touch()
    assert find_nvidia(str(tmp_path / "no-proc"), str(tmp_path / "nvidia0")).present
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    found = find_nvidia(str(tmp_path / "no-proc"), str(tmp_path / "no-dev"))
    assert found.present and found.nvidia_smi == str(smi)


def test_the_message_names_the_gpu_the_build_and_the_fix():
    old_driver = NvidiaEvidence("550.54.15", True, "/usr/bin/nvidia-smi")
    cuda13 = unusable_gpu_message(old_driver, False, "2.13.0", "13.0")
    assert "driver 550.54.15" in cuda13 and "CUDA 13.0 build" in cuda13 and "580 series" in cuda13
    assert CUDA12_INSTALL in cuda13 and "will run on the CPU" in cuda13
    cpu_build = unusable_gpu_message(old_driver, False, "2.13.0+cpu", None)
    assert "CPU-only build" in cpu_build and CUDA12_INSTALL in cpu_build and "580" not in cpu_build
    node_only = unusable_gpu_message(NvidiaEvidence(None, True, None), False, "2.13.0", None)
    assert "/dev/nvidia0" in node_only
    # Nothing to say: torch can use the GPU, or there is none.
    assert unusable_gpu_message(old_driver, True, "2.13.0", "13.0") is None
    assert unusable_gpu_message(NvidiaEvidence(None, False, None), False, "2.13.0", None) is None


def test_device_auto_warns_once_when_a_gpu_is_here_that_torch_cannot_use(monkeypatch, caplog):
    monkeypatch.setattr(cuda_check, "find_nvidia", lambda: NvidiaEvidence("550.54.15", False, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda_check, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="fitllm"):
        assert EngineConfig(device="auto").resolve_device() == torch.device("cpu")
        assert EngineConfig(device="auto").resolve_device() == torch.device("cpu")
    warnings = [r for r in caplog.records if "NO GPU FOR FITLLM" in r.getMessage()]
    assert len(warnings) == 1 and CUDA12_INSTALL in warnings[0].getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine's view")
def test_this_machine_has_no_gpu_and_no_warning(caplog):
    """The CI machines have neither driver files nor a GPU: no warning at all."""
    if cuda_check.find_nvidia().present:
        pytest.skip("this machine has NVIDIA driver files")
    with caplog.at_level(logging.WARNING, logger="fitllm"):
        assert EngineConfig(device="auto").resolve_device() == torch.device("cpu")
    assert not caplog.records
