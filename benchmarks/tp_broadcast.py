"""`fitllm bench tp-broadcast`: what a tensor-parallel step's input broadcast costs on gloo, two processes.

For decode batches and a prefill chunk, a step's `BatchLayout` goes from rank 0 to rank 1 as the engine sends
it (one pickled `StepMessage`, `broadcast_object_list`), against the same integers packed into one int64
tensor (a length, then the tensor: two broadcasts, plus packing and unpacking). The two alternate, per
size, in one run. An all-reduce of one layer's hidden state at that batch (bfloat16, 576 wide: SmolLM2-135M)
is timed alongside, since a step makes two per layer. Figures are rank 0's microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fitllm.engine.parallel.messages import StepMessage
from fitllm.model.attention.batch import BatchLayout

SIZES = [(1, 0), (8, 0), (64, 0), (0, 512)]  # (decodes, prefill tokens)
CONTEXT = 600  # tokens already cached per decode


def layout_of(decodes: int, prefill: int, block_size: int = 16) -> BatchLayout:
    layout = BatchLayout(block_size, num_decodes=decodes)
    blocks = -(-(CONTEXT + 1) // block_size)
    for i in range(decodes):
        table = list(range(i * blocks, (i + 1) * blocks))
        layout.add_sequence(table, CONTEXT, CONTEXT + 1)
        layout.input_ids.append(100 + i)
        layout.sample_rows.append(len(layout.input_ids) - 1)
    if prefill:
        layout.add_sequence(list(range(-(-prefill // block_size))), 0, prefill)
        layout.input_ids.extend(range(prefill))
        layout.sample_rows.append(len(layout.input_ids) - 1)
    return layout


def pack(layout: BatchLayout) -> torch.Tensor:
    """The layout's integers in one int64 tensor: counts, then each list, block tables row by row."""
    head = [layout.block_size, layout.num_decodes, len(layout.input_ids), len(layout.seq_lens)]
    head += [len(t) for t in layout.block_tables] + [len(layout.sample_rows)]
    body = layout.input_ids + layout.positions + layout.slot_mapping + layout.query_start + layout.seq_lens
    body += [b for t in layout.block_tables for b in t] + layout.sample_rows
    return torch.tensor(head + body, dtype=torch.int64)


def unpack(flat: torch.Tensor) -> BatchLayout:
    v = flat.tolist()
    bs, nd, t, s = v[:4]
    lens = v[4 : 4 + s]
    i = 4 + s
    ns = v[i]
    i += 1
    layout = BatchLayout(bs, num_decodes=nd)
    for name, n in (
        ("input_ids", t),
        ("positions", t),
        ("slot_mapping", t),
        ("query_start", s + 1),
        ("seq_lens", s),
    ):
        setattr(layout, name, v[i : i + n])
        i += n
    for n in lens:
        layout.block_tables.append(v[i : i + n])
        i += n
    layout.sample_rows = v[i : i + ns]
    return layout


def send_object(layout: BatchLayout | None) -> BatchLayout:
    box = [StepMessage("step", [], layout) if layout is not None else None]
    dist.broadcast_object_list(box, src=0)
    return box[0].layout


def send_packed(layout: BatchLayout | None) -> BatchLayout:
    flat = pack(layout) if layout is not None else None
    n = torch.tensor([0 if flat is None else flat.numel()], dtype=torch.int64)
    dist.broadcast(n, src=0)
    if flat is None:
        flat = torch.empty(int(n), dtype=torch.int64)
    dist.broadcast(flat, src=0)
    return unpack(flat)


def rank_main(rank: int, iters: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for decodes, prefill in SIZES:
        layout = layout_of(decodes, prefill) if rank == 0 else None
        hidden = torch.randn(max(decodes, prefill), 576).to(torch.bfloat16)
        totals = {"object": 0.0, "packed": 0.0, "all_reduce": 0.0}
        for i in range(iters + 5):
            for name, fn in (("object", send_object), ("packed", send_packed)):
                start = time.perf_counter()
                got = fn(layout)
                if i >= 5:
                    totals[name] += time.perf_counter() - start
                assert rank == 0 or got.slot_mapping == layout_of(decodes, prefill).slot_mapping
            start = time.perf_counter()
            dist.all_reduce(hidden)
            if i >= 5:
                totals["all_reduce"] += time.perf_counter() - start
        if rank == 0:
            out[(decodes, prefill)] = {k: v / iters * 1e6 for k, v in totals.items()}
    dist.destroy_process_group()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=200, help="timed messages per size and method")


def run(args: argparse.Namespace) -> int:
    from benchmarks.measure import machine_facts
    from fitllm.engine.parallel.group import free_port

    port = free_port()
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(rank_main, args=(args.iters, port, out), nprocs=2, start_method="spawn")
    facts = machine_facts()
    print(
        f"fitllm bench tp-broadcast: gloo, 2 processes (1 thread each), {args.iters} messages each; "
        f"{facts['cpu_model']}, {facts['cpus_usable']} CPUs, load {facts['loadavg_start'][0]:.1f}, {facts['date']}"
    )
    print(f"{'step':>22} {'object us':>10} {'packed us':>10} {'obj/packed':>10} {'all-reduce us':>14}")
    for decodes, prefill in SIZES:
        r = out[(decodes, prefill)]
        name = f"{decodes} decodes" if decodes else f"{prefill}-token prefill"
        print(
            f"{name:>22} {r['object']:>10.0f} {r['packed']:>10.0f} {r['object'] / r['packed']:>10.2f} "
            f"{r['all_reduce']:>14.0f}"
        )
    return 0
