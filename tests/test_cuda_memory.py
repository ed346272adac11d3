"""What the ledger does not see on CUDA, checked on CPU through stand-ins: `memory_report` shows the caching
allocator's allocated and reserved bytes beside the ledger, and released KV slabs are given back to the device
(torch.cuda.empty_cache), not kept in PyTorch's cache where the device still counts them (issue 23, item 6)."""

from __future__ import annotations

import torch
from conftest import make_random_checkpoint, run_all

from fitllm.config import EngineConfig
from fitllm.engine import report
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams


def _engine(tmp_path) -> Engine:
    folder = make_random_checkpoint(tmp_path)
    # 2 blocks of 16 tokens per slab (2 layers, 2 KV heads, head dim 16, float32): prompts spread over slabs.
    # No retention budget: idle release gives every slab but slab 0 back (tests/test_kv_retention.py keeps some).
    slab = 2 * 16 * 2 * 2 * 2 * 16 * 4
    return Engine(
        EngineConfig(
            model=str(folder),
            dtype="float32",
            max_model_len=128,
            kv_slab_size=slab,
            kv_idle_release_s=0,
            kv_cache_retention=0,
        )
    )


def test_released_slabs_are_given_back_to_the_device(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    calls = []
    monkeypatch.setattr("fitllm.engine.engine.give_back_to_device", calls.append)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    peak = []
    run_all(
        engine,
        [list(range(3, 60)), list(range(5, 70))],
        params=params,
        on_step=lambda e: peak.append(e.pool.num_slabs),
    )
    assert max(peak) > 1, "the pool never grew"
    engine.release_idle_memory()
    assert engine.pool.num_slabs == 1 and engine.pool.num_releases >= 1
    assert calls and all(d == engine.device for d in calls)
    # Nothing released: nothing to give back.
    calls.clear()
    assert engine.release_idle_memory() == 0 and not calls


def test_give_back_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    report.give_back_to_device(torch.device("cpu"))
    assert not emptied
    report.give_back_to_device(torch.device("cuda"))
    assert emptied == [1]


def test_memory_report_shows_the_allocator_beside_the_ledger(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 300 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: engine.ledger.total + (40 << 20))
    text = engine.memory_report()
    line = next(line for line in text.splitlines() if line.startswith("CUDA allocator"))
    assert "300.00 MiB allocated" in line and "reserved" in line
    assert "40.00 MiB)" in line  # reserved beyond the ledger: fragmentation and cache
