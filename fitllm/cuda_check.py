"""An NVIDIA GPU that torch cannot use: say so at start, with the fix, instead of running on the CPU quietly.

`pip install torch==2.13.0` from PyPI brings a CUDA 13 build, which needs an NVIDIA driver of the 580
series or later; on a machine with an older driver (CUDA 12) `torch.cuda.is_available()` is False and
`--device auto` would pick the CPU without a word. The same happens with a CPU-only build (this project's
CI machines install one). Evidence of a GPU is read from the driver's own files, not from torch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass

import torch

log = logging.getLogger("fitllm")

PROC_VERSION = "/proc/driver/nvidia/version"
DEVICE_NODE = "/dev/nvidia0"
# PyTorch's CUDA 12.6 wheels, for drivers of the 525-575 series (CUDA 12); other cu12x indexes work too.
CUDA12_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
CUDA13_MIN_DRIVER = 580  # the first driver series for CUDA 13.0


@dataclass(slots=True)
class NvidiaEvidence:
    """What says an NVIDIA GPU is here: the kernel driver's version file, a device node, nvidia-smi."""

    driver: str | None  # e.g. "550.54.15", from PROC_VERSION
    device_node: bool
    nvidia_smi: str | None  # its path

    @property
    def present(self) -> bool:
        return self.driver is not None or self.device_node or self.nvidia_smi is not None


def find_nvidia(
    proc_version: str = PROC_VERSION, device_node: str = DEVICE_NODE, smi: str | None = "nvidia-smi"
) -> NvidiaEvidence:
    """Look for an NVIDIA GPU without torch (paths are parameters so tests can point them elsewhere)."""
    driver = None
    try:
        with open(proc_version) as f:
            text = f.read()
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        driver = m.group(1) if m else "unknown"
    except OSError:
        pass
    return NvidiaEvidence(driver, os.path.exists(device_node), shutil.which(smi) if smi else None)


def unusable_gpu_message(
    evidence: NvidiaEvidence, cuda_available: bool, torch_version: str, torch_cuda: str | None
) -> str | None:
    """The warning to print when an NVIDIA GPU is here and torch cannot use it; None otherwise."""
    if cuda_available or not evidence.present:
        return None
    seen = (
        f"driver {evidence.driver}"
        if evidence.driver
        else (DEVICE_NODE if evidence.device_node else f"{evidence.nvidia_smi}")
    )
    build = f"a CUDA {torch_cuda} build" if torch_cuda else "a CPU-only build"
    lines = [
        f"An NVIDIA GPU is present ({seen}) but torch {torch_version} ({build}) cannot use it: "
        "fitllm will run on the CPU, far slower.",
    ]
    major = _driver_major(evidence.driver)
    if torch_cuda and torch_cuda.startswith("13") and major is not None and major < CUDA13_MIN_DRIVER:
        lines.append(
            f"This torch needs a driver of the {CUDA13_MIN_DRIVER} series or later for CUDA 13; this one is "
            f"{evidence.driver} (CUDA 12)."
        )
    lines.append(
        f"Fix: install torch built for CUDA 12 (drivers 525 and later): `{CUDA12_INSTALL}` "
        "(`nvidia-smi` shows the CUDA version the driver supports), or update the NVIDIA driver. "
        "Then `python -c 'import torch; print(torch.cuda.is_available())'` prints True."
    )
    return " ".join(lines)


def _driver_major(driver: str | None) -> int | None:
    m = re.match(r"(\d+)\.", driver or "")
    return int(m.group(1)) if m else None


_warned = False


def warn_if_gpu_unusable() -> str | None:
    """Log (once per process) the warning of `unusable_gpu_message` for this machine; returns it."""
    global _warned
    if torch.cuda.is_available():
        return None
    message = unusable_gpu_message(find_nvidia(), False, torch.__version__, torch.version.cuda)
    if message and not _warned:
        _warned = True
        log.warning("!" * 20 + " NO GPU FOR FITLLM " + "!" * 20 + "\n%s", message)
    return message
