"""A tensor-parallel worker (rank 1..N-1): its shard of the model and its share of the KV pool, following
rank 0's messages until told to stop.

Spawned by rank 0 (`worker_main`), or launched by torchrun on any host: every rank runs the same
`fitllm serve ... --tensor-parallel-size N`, and the CLI runs `run_worker` on ranks above 0 (README).
A worker never schedules or samples: it replays rank 0's slab ops, builds the step's attention metadata from
the broadcast batch layout and runs the forward, whose all-reduces meet rank 0's, then computes its shard of
the sampled rows' logits (the LM head is vocab-parallel), which rank 0 gathers.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from fitllm.config import EngineConfig, resolve_dtype
from fitllm.distributed import destroy_tp_group, init_tp_group, rank_kv_config, tp_barrier
from fitllm.engine.parallel.messages import LOAD_TIMEOUT_S, StepMessage, receive
from fitllm.engine.parallel.ranks import rank_device
from fitllm.engine.runner import apply_shift, profile_workspace, scratch_prefill
from fitllm.engine.scorer import logit_chunks
from fitllm.loader import build_model, open_model
from fitllm.memory.budget import resolve_budget
from fitllm.memory.host import IdleHeapTrim
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.transfer import to_device_packed
from fitllm.model.attention import metadata_builder, resolve_attention_backend
from fitllm.quant import engine_quant_method, resolve_config

log = logging.getLogger("fitllm")


class Worker:
    """One rank's model, ledger and KV storage, driven by `handle`."""

    def __init__(self, rank: int, world_size: int, config: EngineConfig) -> None:
        self.rank, self.config = rank, config
        self.device = rank_device(config.resolve_device(), rank)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        init_tp_group(rank, world_size, self.device, config.tp_timeout_s)
        source = open_model(config.model)
        config = resolve_config(config, source)  # --quantization auto, as rank 0 resolves it
        self.model_config = mc = source.config
        self.kv_config = rank_kv_config(mc, world_size)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.backend = resolve_attention_backend(config.attention_backend, self.device)
        self.ledger = MemoryLedger(resolve_budget(config.memory_budget, self.device))
        quant = engine_quant_method(config, mc, self.device, self.dtype)
        self.kv_format = KVCacheFormat(config.kv_cache_dtype, self.dtype, mc.head_dim)
        # Built for one position; rank 0's "setup" gives the context (as --max-model-len auto does).
        self.model = build_model(source, self.dtype, self.device, 1, False, quant)
        source.release()
        self.ledger.reserve("weights", sum(p.numel() * p.element_size() for p in self.model.parameters()))
        self.storage: KVSlabStorage | None = None
        self.metadata = None
        self.heap_trim = IdleHeapTrim()

    def handle(self, msg: StepMessage) -> None:
        """Do what rank 0 does with the model for `msg` (after its slab ops)."""
        if self.storage is not None:
            self.storage.replay(msg.slab_ops)
        getattr(self, f"_{msg.kind}")(msg)
        if msg.kind != "idle":
            self.heap_trim.worked()

    def _idle(self, msg: StepMessage) -> None:
        tp_barrier(self.config.tp_timeout_s)  # rank 0's heartbeat: it learns this rank still answers
        self.heap_trim.idle()

    def _setup(self, msg: StepMessage) -> None:
        a = msg.args
        self.model.prepare(self.device, self.dtype, a["max_model_len"])
        workspace = a["planned"]
        if a["profile"]:
            workspace = profile_workspace(
                self.model,
                self.kv_config,
                self.device,
                a["tokens"],
                a["rows"],
                backend=self.backend,
                max_model_len=a["max_model_len"],
                decode_cap=a["decode_cap"],
                sample=False,
            )
        self.ledger.reserve("workspace", workspace)

    def _kv_pool(self, msg: StepMessage) -> None:
        a, kc = msg.args, self.kv_config
        self.storage = KVSlabStorage(
            kc.num_hidden_layers,
            kc.num_key_value_heads,
            self.kv_format,
            a["block_size"],
            a["slab_blocks"],
            a["max_slabs"],
            self.device,
            self.ledger,
        )
        self.storage.replay([("add", 0)])
        storage = self.storage
        storage.bind(self.model.attention_layers())
        self.metadata = metadata_builder(
            self.backend, kc.num_key_value_heads, kc.sliding_window, storage.view_slots, a["decode_cap"]
        )

    @torch.inference_mode()
    def _step(self, msg: StepMessage) -> None:
        batch = msg.layout
        assert batch is not None and self.metadata is not None
        input_ids, positions, slots = to_device_packed(
            [batch.input_ids, batch.positions, batch.slot_mapping], torch.long, self.device
        )
        meta = self.metadata.build(batch, self.device, slots)
        hidden = self.model(input_ids, positions, meta)
        if batch.sample_rows:  # this rank's shard of the sampled rows' logits, gathered to rank 0
            rows = torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
            self.model.compute_logits(hidden.index_select(0, rows))

    @torch.inference_mode()
    def _score(self, msg: StepMessage) -> None:
        ids = msg.args["ids"]
        n = len(ids)
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        with scratch_prefill(self.model, self.kv_config, self.device, n, n, self.kv_format) as meta:
            hidden = self.model(tokens, torch.arange(n, device=self.device), meta)
        for start, end in logit_chunks(n):  # as SequenceScorer forms them on rank 0
            self.model.compute_logits(hidden[start:end])

    @torch.inference_mode()
    def _shift(self, msg: StepMessage) -> None:
        assert self.storage is not None
        for src, dst, delta, adopted, moved_by in msg.args["shifts"]:
            as_long = [torch.tensor(x, dtype=torch.long) for x in (src, dst, delta)]
            apply_shift(self.storage, self.model.rotary, *as_long, adopted, moved_by)


def run_worker(rank: int, world_size: int, config: EngineConfig) -> None:
    """Follow rank 0 until it says stop (or is lost: the receive raises)."""
    worker = Worker(rank, world_size, config)
    tp_barrier(LOAD_TIMEOUT_S)  # every rank loaded (rank 0 meets it before its first message)
    log.info("tensor parallel: rank %d of %d ready (pid %d)", rank, world_size, os.getpid())
    try:
        while True:
            msg = receive()
            if msg.kind == "stop":
                tp_barrier(5.0)  # rank 0 meets it too (TensorParallelGroup.close) before anyone leaves
                break
            worker.handle(msg)
    finally:
        destroy_tp_group()


def worker_main(rank: int, world_size: int, config: EngineConfig, env: dict[str, str]) -> None:
    """A spawned worker's entry: rank 0's environment (MASTER_ADDR / MASTER_PORT), then `run_worker`."""
    os.environ.update(env)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    try:
        run_worker(rank, world_size, config)
    except Exception:
        log.exception("tensor-parallel worker rank %d failed", rank)
        sys.exit(1)
