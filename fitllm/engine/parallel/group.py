"""Rank 0's side of the tensor-parallel group: starting the workers, sending each step, noticing a lost one.

On one host rank 0 spawns ranks 1..N-1 (torch.multiprocessing, spawn) and they meet through MASTER_ADDR /
MASTER_PORT (a free loopback port unless set). Under torchrun every rank is launched for it (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; every rank runs the same `fitllm serve` and the CLI makes ranks
above 0 workers: README), and rank 0 spawns nothing.

A worker that dies is seen by a watchdog thread within a quarter second (spawned workers: their exit
code), a hung one by the idle heartbeat's barrier or a step's collective within `--tp-timeout-s`; either way
the engine raises `WorkerLost`, the async engine marks itself failed (/health answers 503) and nothing
waits forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from fitllm.config import EngineConfig
from fitllm.distributed import destroy_tp_group, init_tp_group, rendezvous_from_env, tp_barrier
from fitllm.engine.parallel.messages import StepMessage, broadcast

log = logging.getLogger("fitllm")

WATCH_INTERVAL_S = 0.25


class WorkerLost(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot step any more."""


def free_port() -> int:
    """A free loopback port for the rendezvous (a spawned group on one host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_with_tp(config: EngineConfig) -> None:
    """Features whose K/V or weights would live on rank 0 alone, refused with tensor parallelism."""
    if config.preemption_mode == "swap":
        raise ValueError(
            "--preemption-mode swap parks K/V that rank 0 alone would hold; with "
            "--tensor-parallel-size use --preemption-mode recompute (or auto)"
        )
    if config.kv_host_cache:
        raise ValueError("--kv-host-cache is not supported with --tensor-parallel-size > 1; leave it at 0")
    if config.cpu_offload_gb:
        raise ValueError(
            "--cpu-offload-gb is not supported with --tensor-parallel-size > 1; add ranks or "
            "raise --memory-budget instead"
        )


class TensorParallelGroup:
    """Rank 0's handle on the group: `send` one message per step, `close` ends every worker."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.world_size = config.tensor_parallel_size
        self.timeout_s = config.tp_timeout_s
        self.failure: WorkerLost | None = None
        self.on_failure: list[Callable[[WorkerLost], None]] = []
        self._procs: list[mp.Process] = []
        self._closed = threading.Event()
        env = rendezvous_from_env()
        if env is not None:  # torchrun launched every rank
            rank, world = env
            if rank != 0 or world != self.world_size:
                raise ValueError(
                    f"torchrun gave RANK={rank} WORLD_SIZE={world}; rank 0 runs the engine with "
                    f"--tensor-parallel-size {world}, the others run fitllm.engine.parallel.worker"
                )
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world_size):
                from fitllm.engine.parallel.worker import worker_main

                proc = ctx.Process(
                    target=worker_main,
                    args=(rank, self.world_size, config, dict(os.environ)),
                    name=f"fitllm-tp{rank}",
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
            log.info("tensor parallel: %d ranks, workers %s", self.world_size, [p.pid for p in self._procs])
        try:
            init_tp_group(0, self.world_size, device, config.tp_timeout_s)
        except BaseException:
            self._end_workers(0.0)
            raise
        if self._procs:
            threading.Thread(target=self._watch, name="fitllm-tp-watch", daemon=True).start()
        # A command that ends without closing its engine (generate, eval, a script) still stops the
        # workers cleanly: before multiprocessing's own exit handler, which would only terminate them.
        atexit.register(self.close)

    @property
    def pids(self) -> list[int]:
        """The spawned workers' process ids (empty under torchrun)."""
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def exit_codes(self) -> list[int | None]:
        """The spawned workers' exit codes (None: still running)."""
        return [p.exitcode for p in self._procs]

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_INTERVAL_S):
            for rank, proc in enumerate(self._procs, start=1):
                if proc.exitcode is not None:
                    self.fail(
                        WorkerLost(
                            f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                            f"{proc.exitcode}; the engine cannot run the model: restart the server"
                        )
                    )
                    return

    def fail(self, exc: WorkerLost) -> None:
        """Record the group's loss once, log it, tell whoever listens (the async engine)."""
        if self.failure is not None:
            return
        self.failure = exc
        log.error("%s", exc)
        for callback in self.on_failure:
            callback(exc)

    def send(self, message: StepMessage) -> None:
        """Broadcast `message` to the workers; WorkerLost if one is gone or the broadcast fails."""
        if self.failure is not None:
            raise self.failure
        try:
            broadcast(message)
        except Exception as exc:  # gloo: a peer's socket closed, or the timeout passed
            self.fail(WorkerLost(f"tensor-parallel broadcast failed ({exc}); a worker is lost"))
            raise self.failure from exc

    def barrier(self, timeout_s: float) -> None:
        """Wait for every worker (WorkerLost after `timeout_s`): after loading, which may take one rank far
        longer than the collective timeout allows, and on each heartbeat, where a hung rank shows."""
        if self.failure is not None:
            raise self.failure
        try:
            tp_barrier(timeout_s)
        except Exception as exc:
            self.fail(WorkerLost(f"a tensor-parallel worker did not answer within {timeout_s:g} s ({exc})"))
            raise self.failure from exc

    def heartbeat(self, message: StepMessage) -> None:
        """An idle turn's message, then a barrier: a worker that hangs is reported within the collective
        timeout even when no request comes (a broadcast alone can sit in a socket buffer)."""
        self.send(message)
        self.barrier(self.timeout_s)

    def close(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Stop every worker (asked first unless the group is lost or not `graceful`, then terminated) and
        leave the group."""
        if self._closed.is_set():
            return
        self._closed.set()
        graceful = graceful and self.failure is None
        if graceful:
            try:
                broadcast(StepMessage("stop"))
                # Every rank meets before any leaves the group: a rank that tears its connections down while
                # another still reads from them aborts that one (gloo: "terminate called without an active
                # exception").
                tp_barrier(min(timeout, 5.0))
            except Exception:
                log.warning("tensor parallel: a worker did not take the stop message; terminating")
        self._end_workers(timeout if graceful else 0.5)
        destroy_tp_group()

    def _end_workers(self, timeout: float) -> None:
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
