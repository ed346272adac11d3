"""The CPU tier's file side: where the offload file may go (a folder on tmpfs keeps it in RAM, which is
warned about), and the bandwidth probes behind the offload prediction."""

from __future__ import annotations

import logging
import math
import tempfile

import pytest
import torch
from torch import nn

from fitllm.memory.offload import copy_engine
from fitllm.memory.offload.copy_engine import OffloadFile, make_sink, mount_fs_type
from fitllm.memory.offload.layer_layout import LayerLayout

# Invented mount points under a root that does not exist here, so resolving symlinks changes nothing.
MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
tmpfs /fitllm-x/tmp tmpfs rw,nosuid,nodev 0 0
/dev/vdb1 /fitllm-x/tmp/disk xfs rw 0 0
none /fitllm-x/ram ramfs rw 0 0
/dev/vdc1 /fitllm-x/my\\040disk ext4 rw 0 0
tmpfs /fitllm-x/over tmpfs rw 0 0
/dev/vdd1 /fitllm-x/over btrfs rw 0 0
"""


@pytest.mark.parametrize(
    "folder,fs_type",
    [
        ("/fitllm-x/tmp", "tmpfs"),
        ("/fitllm-x/tmp/offload", "tmpfs"),
        ("/fitllm-x/tmp/disk/offload", "xfs"),  # a disk mounted inside the tmpfs
        ("/fitllm-x/tmpfoo", "ext4"),  # a name that merely starts with a mount point's
        ("/fitllm-x/ram/a", "ramfs"),
        ("/fitllm-x/my disk/a", "ext4"),  # octal escapes in mount points
        ("/fitllm-x/over/a", "btrfs"),  # mounted over: the last mount wins
        ("/srv", "ext4"),
    ],
)
def test_mount_fs_type_finds_the_mount_holding_the_folder(folder, fs_type):
    assert mount_fs_type(folder, MOUNTS) == fs_type


def test_mount_fs_type_without_a_table_is_unknown():
    assert mount_fs_type("/fitllm-x/tmp", None) is None
    assert mount_fs_type("/fitllm-x/tmp", "") is None


def _sink_logs(monkeypatch, caplog, tmp_path, fs_type: str, offload_dir: str | None) -> str:
    """make_sink's warnings when the mount table says `tmp_path` is on `fs_type`."""
    table = f"/dev/vda1 / ext4 rw 0 0\nfs {tmp_path.resolve()} {fs_type} rw 0 0\n"
    monkeypatch.setattr(copy_engine, "_read_mounts", lambda: table)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what TMPDIR would choose
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fitllm"):
        sink = make_sink(LayerLayout.of(nn.Linear(4, 4)), 1, torch.device("cpu"), offload_dir)
    assert isinstance(sink, OffloadFile)
    sink.close()
    return caplog.text


def test_an_offload_folder_in_ram_is_warned_about_naming_the_flag(monkeypatch, caplog, tmp_path):
    for fs_type in ("tmpfs", "ramfs"):
        text = _sink_logs(monkeypatch, caplog, tmp_path, fs_type, str(tmp_path))
        assert f"on {fs_type}" in text and "--offload-dir" in text and "TMPDIR" not in text
    # The default folder (the temp folder) also names TMPDIR, which is what chose it.
    text = _sink_logs(monkeypatch, caplog, tmp_path, "tmpfs", None)
    assert "--offload-dir" in text and "TMPDIR" in text
    assert _sink_logs(monkeypatch, caplog, tmp_path, "ext4", str(tmp_path)) == ""


def test_the_real_mount_table_names_the_temp_folders_filesystem():
    # Linux (what fitllm's CI and servers run): /proc/mounts is there and holds the temp folder.
    fs_type = mount_fs_type(tempfile.gettempdir(), copy_engine._read_mounts())
    assert isinstance(fs_type, str) and fs_type


# ---- bandwidth probes (fitllm/memory/offload/bandwidth.py) ------------------------------------------------------


def test_file_read_and_memory_bandwidth_probes_are_finite_and_positive(tmp_path):
    from fitllm.memory.offload.bandwidth import (
        file_read_bandwidth,
        measure_offload_estimate,
        memory_bandwidth,
    )

    small = 1 << 20
    for rate in (
        file_read_bandwidth(str(tmp_path), nbytes=small),
        memory_bandwidth(torch.device("cpu"), small),
    ):
        assert math.isfinite(rate) and rate > 1e6, rate  # over 1 MB/s: a real rate, not a unit slip
    assert list(tmp_path.iterdir()) == []  # the probe's file is unlinked at once
    estimate = measure_offload_estimate(torch.device("cpu"), str(tmp_path))
    assert estimate.tier == "file" and not estimate.overlap
    assert math.isfinite(estimate.transfer) and estimate.transfer > 0
    assert math.isfinite(estimate.memory) and estimate.memory > 0
