"""A Llama-family model's decoder layers for a CPU decode step in one call to fitllm's C loop
(fitllm/kernels/decode_layers.c), where the step is in the form it reads; PyTorch's path otherwise.

Why: at batch 1 the per-call cost of Python and PyTorch is about half of a small model's decode step on CPU
(~1000 calls a step: four GEMMs, attention, two norms, rotary, the KV write, SiLU * up, views and output
tensors, 30 times). The loop runs the same kernels the PyTorch path calls, with the small ops between them
rounded where PyTorch's bfloat16 ops round them, so the step's numbers are those of PyTorch's path (tested;
SiLU's float32 exp may differ in its last bit).

The form: bfloat16 activations, every linear served by one of fitllm's kernels for up to MAX_ROWS rows
(each quant method's `cpu_linear` says so by its own rule), rotate-half rotary, a decode-only step in one
decode group whose mask is only each request's length (no sliding window), one KV slab, a cache in the
model dtype or int8 (`--kv-cache-dtype int8`, encoded as fitllm/memory/kv/format.py encodes), one tensor-parallel
rank, and not under torch.compile. The plan of pointers to
the weights is taken once per model; weights on CPU do not move after loading. `FITLLM_DECODE_LOOP=0` leaves
every step to PyTorch's layers (A/B measurements; `FITLLM_CPU_KERNELS=0` turns all of fitllm's kernels off).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from fitllm.model.attention.cpu_decode import KV_INT8, KV_SAME, decode_attention_kernel
from fitllm.model.attention.torch_backend import TorchMetadata
from fitllm.model.cpu_norm import rms_norm_kernel
from fitllm.model.layers import RotaryTables
from fitllm.quant.cpu_kernels import CLinear, cpu_supports, load_library

# Decode rows per step up to which the loop may serve; each model's own limit is the most rows every one of its
# linears' kernels takes (bfloat16: 16, int8: 15-31 by layer size, int4: 47), found once per model.
MAX_ROWS = 64


class CLayer(ctypes.Structure):
    """One decoder layer as decode_layers.c reads it (`fitllm_layer`)."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", CLinear),
        ("o", CLinear),
        ("gate_up", CLinear),
        ("down", CLinear),
    ]


class CDims(ctypes.Structure):
    """The model's shapes as decode_layers.c reads them (`fitllm_dims`)."""

    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("rotary_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


@dataclass
class CpuDecodeLayers:
    """The C loop's plan for one model: per-layer pointers and shapes (`build`), and the step call (`run`)."""

    fn: ctypes._CFuncPtr
    max_rows: int  # decode rows per step up to which every layer's kernels serve
    layers: ctypes.Array  # CLayer per decoder layer
    dims: CDims
    attention: list  # each layer's PagedAttention (its KV slabs are bound per step)
    modules: list[torch.nn.Module]  # the decoder layers (hooks on them keep the loop off)
    keep: list[torch.Tensor]  # the tensors the plan points into, kept alive with it
    bf16_dot: int

    @classmethod
    def build(cls, model: torch.nn.Module) -> CpuDecodeLayers | None:
        """The plan for a LlamaForCausalLM whose layers are all in the loop's form, else None."""
        lib = load_library()
        if (
            os.environ.get("FITLLM_DECODE_LOOP", "1") == "0"
            or lib is None
            or rms_norm_kernel() is None
            or decode_attention_kernel() is None
        ):
            return None
        config, rotary = model.config, model.rotary
        if any(layer._forward_pre_hooks or layer._forward_hooks for layer in model.layers):
            return None  # streamed layers (offload): their parameters are bound by the hooks, step by step
        params = list(model.layers.parameters())
        if any(p.device.type != "cpu" or p.numel() == 0 for p in params):
            return None  # a layer split onto another device, or parameters released
        if rotary.interleaved or rotary.rotary_dim % 2 or rotary.rotary_dim > min(config.head_dim, 512):
            return None
        # The most rows every linear's kernel serves, at most MAX_ROWS: each method's rule is "up to some
        # rows", so the served counts are 1..limit and a bisection finds the limit.
        low, high = 0, MAX_ROWS
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if _all_served(model, mid) else (low, mid - 1)
        rows = low
        if rows == 0:
            return None
        keep: list[torch.Tensor] = []
        layers = []
        for layer in model.layers:
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms):
                return None
            linears = [_linear(lin, rows, keep) for lin in _linears(layer)]
            if any(lin is None for lin in linears):
                return None
            keep += norms
            layers.append(CLayer(norms[0].data_ptr(), norms[1].data_ptr(), *linears))
        first = model.layers[0].self_attn
        if first.num_heads % first.num_kv_heads or first.num_heads // first.num_kv_heads > 64:
            return None
        dims = CDims(
            config.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim, rotary.rotary_dim,
            model.layers[0].mlp.down_proj.in_features, model.layers[0].input_layernorm.eps, first.attn.scale,
        )  # fmt: skip
        fn = lib.fitllm_decode_layers
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, ptr,
                       ctypes.c_int, ctypes.c_int]  # fmt: skip
        fn.restype = ctypes.c_int
        return cls(
            fn, rows, (CLayer * len(layers))(*layers), dims, [layer.self_attn.attn for layer in model.layers],
            list(model.layers), keep,
            int(cpu_supports("avx512_bf16")),
        )  # fmt: skip

    def takes(self, meta: object, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens with metadata `meta` is in the loop's form."""
        if not isinstance(meta, TorchMetadata) or meta.prefills or len(meta.decode_groups) != 1:
            return False
        group = meta.decode_groups[0]
        slab_id = group.rows.parts[0][0]
        if (
            group.num != num_tokens
            or num_tokens > self.max_rows
            or group.lengths is None
            or len(group.rows.parts) != 1
            or len(meta.slot_mapping.parts) != 1
            or meta.slot_mapping.parts[0][1] is not None
            or meta.slot_mapping.parts[0][0] != slab_id
            or self.hooked()
            or torch.compiler.is_compiling()
        ):
            return False
        for attn in self.attention:
            slab = attn.kv_slabs[slab_id]
            fmt = attn.kv_format
            if fmt.name != self.attention[0].kv_format.name or not slab.is_contiguous():
                return False
            if slab.dtype != (torch.uint8 if fmt.name == "int8" else torch.bfloat16):
                return False  # fp8, or a cache in another dtype than the model's
        return True

    def hooked(self) -> bool:
        """Whether a forward hook is on a decoder layer (weight streaming rebinds parameters in them): the
        loop, which never calls the layers' forward, must not serve then."""
        return any(layer._forward_pre_hooks or layer._forward_hooks for layer in self.modules)

    def run(
        self, h: torch.Tensor, rope: RotaryTables, meta: object
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the last layer's output, the residual) for embeddings h [rows, hidden], as the layers' PyTorch
        loop returns them; None where this step is not in the loop's form (the caller runs that loop)."""
        m = h.shape[0]
        if (
            not self.takes(meta, m)
            or h.dtype != torch.bfloat16
            or rope.cos.dtype != torch.bfloat16
            or not h.is_contiguous()
        ):
            return None
        group = meta.decode_groups[0]
        slab_id, _, rows = group.rows.parts[0]
        slots = meta.slot_mapping.parts[0][2]
        kv = []
        for attn in self.attention:
            slab = attn.kv_slabs[slab_id]
            kv += [slab[0].data_ptr(), slab[1].data_ptr()]
        out, residual = torch.empty_like(h), torch.empty_like(h)
        rc = self.fn(
            self.layers, len(self.layers), ctypes.byref(self.dims), m, h.data_ptr(), out.data_ptr(),
            residual.data_ptr(), rope.cos.data_ptr(), rope.sin.data_ptr(), slots.data_ptr(),
            (ctypes.c_void_p * len(kv))(*kv), KV_INT8 if self.attention[0].kv_format.name == "int8" else KV_SAME,
            rows.data_ptr(),
            group.context, group.lengths.data_ptr(),
            self.bf16_dot, torch.get_num_threads(),
        )  # fmt: skip
        if rc == -1:
            raise MemoryError("fitllm_decode_layers: no memory for the step's work buffers")
        if rc != 0:
            raise RuntimeError(f"fitllm_decode_layers: a kernel refused the step (code {rc})")
        return out, residual


def _linears(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """A decoder layer's four linears in the order CLayer holds them."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _all_served(model: torch.nn.Module, rows: int) -> bool:
    """Whether fitllm's kernels serve every decoder linear for calls of 1 to `rows` rows."""
    return all(
        lin.quant.cpu_linear(lin, rows) is not None for layer in model.layers for lin in _linears(layer)
    )


def _linear(layer: torch.nn.Module, rows: int, keep: list[torch.Tensor]) -> CLinear | None:
    """`layer` (a LinearBase) as the loop calls it for up to `rows` rows, its bias included, or None where no
    kernel of fitllm's serves it (or it is split across tensor-parallel ranks)."""
    if layer.tp_size != 1:
        return None
    spec = layer.quant.cpu_linear(layer, rows)
    if spec is None:
        return None
    keep += [t for t in layer.parameters()]
    bias = layer.bias
    if bias is not None:
        if bias.dtype != torch.bfloat16 or not bias.is_contiguous():
            return None
        spec.bias = bias.data_ptr()
    return spec
