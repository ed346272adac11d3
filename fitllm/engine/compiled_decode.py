"""CPU decode steps through one `torch.compile`d forward (`--compile-decode`), with an eager fallback.

At batch 1 on a CPU, a decode step of a small model pays PyTorch's per-op cost ~40 times a layer (norms,
rotary, residual adds, SiLU-mul, views) around the few kernels that do the work. Inductor's C++ backend
fuses those into three loops a layer, and a whole-forward graph pays Python and guards once a step, not once
an op (measured on the default int4 model at 1 thread, in one process, alternating: 1.05-1.22x the eager
step, more on a loaded machine; what is left is mostly the int4 and LM-head kernels themselves). Attention stays eager inside the graph as one opaque call per layer
(fitllm/model/attention/step_op.py), so a graph depends only on the batch size: batch 1 gets its own graph,
and dynamo's automatic dynamic shapes give every larger decode batch one shared graph.

The guards on the model's parameters are dropped (`skip_guard_on_all_nn_modules_unsafe`): they cost
milliseconds a call on this class of machine, and the engine never swaps parameters under the compiled
forward (weight offload, which does, keeps the eager path). Batch 1 compiles at start-up
(`ModelRunner.compile_decode`), a larger batch at its first step (seconds with inductor's disk cache warm,
a minute or two cold on 2 cores). If compiling
fails, the step runs eagerly and so does every later one, with one warning; an error after a shape has
compiled is the step's own and propagates, as an eager step's would.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable

import torch
from torch import nn

from fitllm.model.attention import AttentionMetadata
from fitllm.model.attention.step_op import bound_step
from fitllm.model.attention.torch_backend import TorchMetadata

log = logging.getLogger("fitllm")

# Inductor's options: no guards on the parameters (see above); a C++ wrapper, which calls the kernels without
# Python between them, and no size or alignment checks of every intermediate (measured in one process,
# alternating, int4 batch 1, 1 thread, load ~6.6: eager / Python wrapper / C++ wrapper 68.1 / 62.3 / 55.8 ms a
# step; its cold compile is longer: 106 s against ~40 s for the default model at load 7, 7.5 s warm).
COMPILE_OPTIONS = {
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "cpp_wrapper": True,
    "size_asserts": False,
    "alignment_asserts": False,
}

# Decode batches past this run eagerly: a larger batch's step is dominated by its kernels, and at 48 rows
# the int4 linears change path (fitllm/quant/int4.py), which would be one more compile.
MAX_COMPILED_BATCH = 32


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object, and with the guards
    on the model's modules dropped, a second model in the process (another engine, a test) would otherwise
    run the first one's graph: measured, a 4-layer model took a 2-layer model's graph and decoded other
    tokens. A code object per CompiledDecode keeps each model's graphs its own."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def compile_decode_refusal(
    device: torch.device, attention_backend: str, streamed: bool, tp: bool
) -> str | None:
    """Why `--compile-decode` cannot serve this engine, or None when it can."""
    if device.type != "cpu":
        return "not on CPU (CUDA decode replays CUDA graphs instead)"
    if attention_backend != "torch":
        return f"the {attention_backend} attention backend (it needs the torch backend)"
    if streamed:
        return "layers are streamed (offload rebinds parameters between layers)"
    if tp:
        return "tensor parallelism"
    return None


class CompiledDecode:
    """A model's forward for decode-only steps, compiled; `run` falls back to eager if compiling fails."""

    def __init__(self, model: nn.Module, compiler: Callable[..., Callable] | None = None) -> None:
        """compiler: `torch.compile` (tests bring stand-ins that fail or count)."""
        self.model = model
        self.layers = model.attention_layers()
        self._eager = type(model).forward  # the class's own forward: not an instance override
        compile_fn = compiler or torch.compile
        self._compiled = compile_fn(
            types.MethodType(_own_code(CompiledDecode._traced), self),
            fullgraph=True,
            options=COMPILE_OPTIONS,
        )
        self.compiled_sizes: set[int] = set()
        self.failed: str | None = None  # why compiling failed: then every step runs eagerly
        self.compile_seconds: dict[int, float] = {}

    def _traced(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._eager(self.model, input_ids, positions, None)

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step is one the compiled forward serves: decodes only, torch metadata, a batch of at
        most MAX_COMPILED_BATCH, compiling has not failed, and fitllm's C decode loop does not take it."""
        return (
            self.failed is None
            and isinstance(meta, TorchMetadata)
            and not meta.prefills
            and meta.num_decodes == num_tokens
            and 0 < num_tokens <= MAX_COMPILED_BATCH
            and not self._in_c(meta, num_tokens)
        )

    def _in_c(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether the model runs this step's layers in fitllm's C decode loop, which the eager forward
        takes (fitllm/model/cpu_decode_layers.py)."""
        decodes_in_c = getattr(self.model, "decodes_in_c", None)
        return decodes_in_c is not None and decodes_in_c(meta, num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: TorchMetadata) -> torch.Tensor:
        """The step's hidden states [T, hidden], through the compiled forward (compiling first when T is a
        new size), or eagerly when compiling fails."""
        size = input_ids.shape[0]
        if size in self.compiled_sizes:
            with bound_step(self.layers, meta):
                return self._compiled(input_ids, positions)
        start = time.perf_counter()
        try:
            with bound_step(self.layers, meta):
                hidden = self._compiled(input_ids, positions)
        except Exception as exc:  # noqa: BLE001 (any compiler failure: the eager path still serves)
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning(
                "--compile-decode: compiling the decode step failed (%s); decode runs eagerly", self.failed
            )
            return self._eager(self.model, input_ids, positions, meta)
        self.compile_seconds[size] = time.perf_counter() - start
        self.compiled_sizes.add(size)
        log.info("--compile-decode: decode batch %d compiled in %.1f s", size, self.compile_seconds[size])
        return hidden
