"""The planner: from a config alone (no weights read), what fitllm will hold and whether it fits.

Weight bytes come from the model class itself built on the meta device, so they are exact for every
architecture the registry knows, and equal what the loader later allocates.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fitllm.config import ModelConfig, cdiv
from fitllm.memory.kv.format import kv_bytes_per_token
from fitllm.memory.offload.placement import OffloadEstimate, Placement
from fitllm.plan.weights import WeightBreakdown, weight_breakdown
from fitllm.quant import get_quant_method
from fitllm.units import format_bytes

# Framework overhead that is not ours to control (allocator slack, CPU runtime); reported, not ledgered. On
# CPU it is about what PyTorch and the server's imports take before any weight: 218 MiB for `import torch`,
# 251 with fitllm's, FastAPI's and the tokenizer's (docs/benchmarks.md, session 15).
DEFAULT_OVERHEAD = 256 << 20


def workspace_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    scratch: int = 0,
    reference_context: int | None = None,
    sampled_rows: int | None = None,
    sampling: bool = True,
) -> int:
    """Planned workspace of the largest step: the larger of its two peaks (`sampling` False: the forward's
    only, for a device that computes no logits: a layer split's stages after the first).

    - The MLP of a layer over the step's batched tokens (`layer_activation_bytes`), in the model dtype, and
      with the torch reference backend (`reference_context`: the context it runs at) its attention
      metadata and one decode group's gather (`reference_attention_bytes`).
    - Sampling, per sampled row (at most one per running request, `sampled_rows` with speculation: one more
      per proposed token; EngineConfig.max_sampled_rows): three float32 vocabulary-sized buffers
      (float logits, probabilities, their running sum); the model-dtype logits die at the cast.
    - int8 weights (and int4 on CPU): batches of 16-48 rows or more multiply through one shared model-dtype
      copy of the largest quantized weight (`scratch` elements; fitllm/quant/int8.py, int4.py), held from the
      first such step on.
    The engine measures the real figure with a profile step at start (Engine.workspace_measured).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    mlp = layer_activation_bytes(config, max_num_batched_tokens, elem)
    if reference_context is not None:
        mlp += reference_attention_bytes(
            config, elem, max_num_batched_tokens, max_num_seqs, reference_context
        )
    rows = sampled_rows or min(max_num_seqs, max_num_batched_tokens)
    logits = rows * config.vocab_size * 3 * 4 if sampling else 0
    return max(mlp, logits) + scratch * elem


def reference_attention_bytes(
    config: ModelConfig, elem: int, num_tokens: int, max_num_seqs: int, context: int
) -> int:
    """What the torch reference attention backend holds through a forward beyond the layer's activations,
    in its largest step (max_num_seqs - 1 decodes at the full `context` beside a last prefill chunk of it):
    each decode's gather rows (int64 per KV head) and mask over the whole context, the chunk's
    [chunk, context] mask, and one decode group's gathered K and V (`max(num_tokens, context)` tokens,
    fitllm/engine/runner.py's decode_groups). The Triton kernels read through block tables instead."""
    decodes = min(max_num_seqs - 1, num_tokens - 1)
    decode_meta = decodes * context * (config.num_key_value_heads * 8 + 1)
    chunk_mask = min(num_tokens - decodes, context) * context
    group = 2 * config.num_key_value_heads * max(num_tokens, context) * config.head_dim * elem
    return decode_meta + chunk_mask + group


def layer_activation_bytes(config: ModelConfig, num_tokens: int, elem: int) -> int:
    """Peak activations of one decoder layer's forward over `num_tokens` tokens, reached in its MLP: the
    residual, the normed input and the previous layer's output (3 x hidden), the fused gate/up output and,
    while SiLU(gate) * up is formed, two more intermediate-sized tensors (4 x intermediate)."""
    return num_tokens * (3 * config.hidden_size + 4 * config.intermediate_size) * elem


# The CUDA caching allocator's granularity (c10/cuda/CUDACachingAllocator.cpp): blocks of 1 MiB or less
# come from 2 MiB segments, blocks up to 10 MiB from 20 MiB segments, larger ones are rounded to 2 MiB.
_SMALL_SEGMENT, _LARGE_SEGMENT = 2 << 20, 20 << 20


def cublas_workspace_bytes(capability: tuple[int, int] | None = None) -> int:
    """The workspace PyTorch gives cuBLAS (and cuBLASLt, which shares it) on each CUDA stream that runs a
    matmul, allocated from the caching allocator and never freed (ATen's CublasHandlePool.cpp):
    CUBLAS_WORKSPACE_CONFIG's `:SIZE_KiB:COUNT` terms summed if set, else 32 MiB on sm_90 / sm_100 and
    8 MiB + 128 KiB before. `capability` None: the current GPU's, or sm_90 (H100/H200) without one."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config and (terms := re.findall(r":(\d+):(\d+)", config)):
        return sum(int(size) * 1024 * int(count) for size, count in terms)
    if capability is None:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    return 32 << 20 if capability in ((9, 0), (10, 0)) else (4096 << 10) * 2 + (16 << 10) * 8


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs (fitllm/engine/cuda_graphs.py): 1, 2, 4 and multiples of 8
    below max_num_seqs, and max_num_seqs itself. Here because the plan sizes their pool."""
    base = [1, 2, 4, *range(8, max_num_seqs, 8)]
    return sorted({s for s in base if s < max_num_seqs} | {max_num_seqs})


def graph_pool_bytes(
    config: ModelConfig, dtype: torch.dtype, max_num_seqs: int, max_model_len: int, block_size: int
) -> int:
    """Planned device bytes of the decode CUDA graphs (fitllm/engine/cuda_graphs.py), which the engine
    reserves before the KV pool takes the rest and replaces with the measured figure after capture.

    - Static inputs, sized for the largest batch: input ids, positions and slots (int64), sequence lengths
      and query starts (int32), and a block table as wide as `max_model_len` needs (int32).
    - Each captured size's output hidden states, which stay alive between replays.
    - One forward's intermediates at the largest size only: the graphs share one pool and are captured
      largest first, so the smaller ones reuse its blocks. Its peak is the layer peak of the workspace.
    - The allocator's segments: the above rounded up to 2 MiB, plus one segment of each smaller kind (the
      flash-decoding partials, under 1 MiB, and the mid-sized blocks come from those).
    - One cuBLAS workspace (`cublas_workspace_bytes`): every size is warmed up and captured on one stream
      of its own (CudaGraphCapturer), and PyTorch gives each stream that runs a matmul a workspace for good.
    """
    sizes = capture_sizes(max_num_seqs)
    top = sizes[-1]
    elem = torch.empty((), dtype=dtype).element_size()
    static = top * (3 * 8 + 4) + (top + 1) * 4 + top * cdiv(max_model_len, block_size) * 4
    outputs = sum(sizes) * config.hidden_size * elem
    pool = outputs + layer_activation_bytes(config, top, elem)
    segments = cdiv(pool, _SMALL_SEGMENT) * _SMALL_SEGMENT + _LARGE_SEGMENT + _SMALL_SEGMENT
    return static + segments + cublas_workspace_bytes()


@dataclass(slots=True)
class Plan:
    """What fits in a budget, and why."""

    model: str
    dtype: str
    kv_dtype: str
    budget: int
    weights: WeightBreakdown
    kv_bytes_per_token: int
    max_model_len: int
    kv_bytes_per_request: int
    workspace: int
    overhead: int
    kv_capacity_tokens: int  # tokens of KV that fit after weights, workspace and overhead
    fits: bool
    max_context_that_fits: int
    max_full_length_requests: int
    placement: Placement | None = None  # decoder layers resident vs streamed (None: all resident)
    resident_weight_bytes: int = 0  # weights held on the device (all of them without offload)
    offload_estimate: OffloadEstimate | None = None  # predicted decode speed with the offload chosen
    graph_pool: int = 0  # decode CUDA graphs' pool and static inputs (0: decode runs eagerly)
    kv_cache_retention: int = 0  # cached KV idle release keeps, within the KV room (--kv-cache-retention)
    kv_host_cache: int = 0  # host memory for prefix KV evicted from the device, outside the budget
    tensor_parallel_size: int = 1  # >1: every figure is one GPU's (rank 0's), the budget each GPU's
    suggestions: list[str] = field(default_factory=list)

    @property
    def staging_bytes(self) -> int:
        return 0 if self.placement is None else self.placement.staging_bytes

    @property
    def fixed_bytes(self) -> int:
        return (
            self.resident_weight_bytes + self.staging_bytes + self.workspace + self.graph_pool + self.overhead
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"]["total"] = self.weights.total
        d["staging_bytes"] = self.staging_bytes
        if self.placement is not None:
            d["placement"]["offloaded_bytes"] = self.placement.offloaded_bytes
        return d

    def table(self) -> str:
        """Human-readable breakdown."""
        w = self.weights
        rows = [
            ("budget", format_bytes(self.budget)),
            ("weights: embedding", format_bytes(w.embedding)),
            ("weights: attention (all layers)", format_bytes(w.attention)),
            ("weights: mlp (all layers)", format_bytes(w.mlp)),
            ("weights: norms", format_bytes(w.norms)),
            (
                "weights: lm_head",
                f"{format_bytes(w.lm_head)} ({w.lm_head_dtype})"
                if w.lm_head
                else f"tied to the embedding ({w.lm_head_dtype})",
            ),
            ("weights: one decoder layer", format_bytes(w.per_layer)),
            ("weights: total", format_bytes(w.total)),
        ]
        p = self.placement
        if p is not None and p.offloaded:
            rows += [
                (
                    "weights: resident",
                    f"{format_bytes(self.resident_weight_bytes)} ({p.resident_layers} of {p.num_layers} "
                    f"decoder layers, embedding, head, norms)",
                ),
                (
                    "weights: offloaded (streamed)",
                    f"{format_bytes(p.offloaded_bytes)} ({len(p.offloaded)} layers: {_ranges(p.offloaded)})",
                ),
                (f"staging (prefetch {p.prefetch})", format_bytes(p.staging_bytes)),
            ]
            e = self.offload_estimate
            if e is not None:
                rows.append(
                    (
                        "predicted decode, batch 1 / 16",
                        f"{e.tokens_per_s(p, 1):.1f} / {e.tokens_per_s(p, 16):.1f} tok/s (all resident: "
                        f"{e.resident_tokens_per_s(p, 1):.1f} / {e.resident_tokens_per_s(p, 16):.1f}; "
                        f"{e.describe()})",
                    )
                )
        rows += [
            ("workspace (largest step)", format_bytes(self.workspace)),
            *([("CUDA graph pool (decode steps)", format_bytes(self.graph_pool))] if self.graph_pool else []),
            ("framework overhead", format_bytes(self.overhead)),
            (f"KV per token ({self.kv_dtype})", format_bytes(self.kv_bytes_per_token)),
            (f"KV per full request ({self.max_model_len} tokens)", format_bytes(self.kv_bytes_per_request)),
            (
                "KV room after the above",
                f"{format_bytes(max(0, self.budget - self.fixed_bytes))} = {self.kv_capacity_tokens} tokens",
            ),
            (
                "KV kept for cached prefixes when idle",
                f"{format_bytes(self.kv_cache_retention)} (--kv-cache-retention, within the KV room)"
                if self.kv_cache_retention
                else "none: idle slabs go with their cached prefixes",
            ),
            (
                "host tier for evicted prefix KV",
                f"{format_bytes(self.kv_host_cache)} of host memory (--kv-host-cache, outside the budget; CUDA only)"
                if self.kv_host_cache
                else "off (--kv-host-cache)",
            ),
            ("largest context that fits (one request)", str(self.max_context_that_fits)),
            (
                f"full-length requests at once ({self.max_model_len} tokens)",
                str(self.max_full_length_requests),
            ),
            ("fits", "yes" if self.fits else "NO"),
        ]
        if self.tensor_parallel_size > 1:
            rows.insert(
                0,
                (
                    "tensor parallel",
                    f"{self.tensor_parallel_size} GPUs: every figure is one GPU's (heads, KV heads and MLP "
                    f"split; embedding and LM head split by vocabulary rows)",
                ),
            )
        width = max(len(r[0]) for r in rows)
        lines = [f"{self.model} ({self.dtype})"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  -> {s}" for s in self.suggestions]
        return "\n".join(lines)


def largest_context_that_fits(
    room: Callable[[int], int], kv_bytes_per_token: int, block_size: int, max_position: int
) -> int:
    """The longest context, in whole KV blocks and at most `max_position`, whose KV fits in `room(length)`:
    the bytes a budget leaves at that context once what grows with the context is taken (the reference
    attention's scratch, the decode graphs' block table). `room` never grows with the length, so a binary
    search over whole blocks finds it. 0 when not one block fits. `fitllm plan` and the engine's
    `--max-model-len auto` both ask this."""

    def fits(blocks: int) -> bool:
        return blocks * block_size * kv_bytes_per_token <= room(min(blocks * block_size, max_position))

    lo, hi = 0, cdiv(max_position, block_size)  # fits(lo) is taken as true; find the largest such
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return min(lo * block_size, max_position)


def offload_suggestion(
    plan: Plan, layers: int, weights: WeightBreakdown, room: int, length: int, prefetch: int
) -> list[str]:
    """How much --cpu-offload-gb would make one full-length request fit, if any amount does."""
    short = plan.kv_bytes_per_request - max(room, 0)
    current = len(plan.placement.offloaded) if plan.placement else 0
    for count in range(current + 1, layers + 1):
        # Each layer streamed frees its resident bytes but the first `prefetch` cost one staging buffer.
        freed = (count - current) * weights.per_layer - (
            min(prefetch, count) - min(prefetch, current)
        ) * weights.layer_stream_bytes
        if freed >= short:
            gib = count * weights.per_layer / (1 << 30)
            return [
                f"--cpu-offload-gb {math.ceil(gib * 100) / 100:.2f} streams {count} of {layers} decoder layers "
                f"from host memory and makes one {length}-token request fit (slower decode: see the "
                f"prediction with that flag)"
            ]
    return []


def _ranges(indices: tuple[int, ...]) -> str:
    """(1, 2, 3, 7) -> '1-3, 7'."""
    out: list[str] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def suggestions(
    plan: Plan,
    config: ModelConfig,
    dtype: torch.dtype,
    room: int,
    quantization: str,
    kv_cache_dtype: str,
    device_type: str = "cpu",
) -> list[str]:
    """Concrete changes that would make a non-fitting plan fit, each with its exact figure."""
    per_token = plan.kv_bytes_per_token
    out: list[str] = []
    if room <= 0:
        out.append(
            f"weights + workspace + overhead need {format_bytes(plan.fixed_bytes)}, {format_bytes(-room)} over "
            f"the budget: raise --memory-budget, lower --max-num-batched-tokens, or offload layers"
        )
    if 2 <= plan.max_context_that_fits < plan.max_model_len:  # a context's workspace may be what is over
        out.append(f"--max-model-len {plan.max_context_that_fits} fits now (or --max-model-len auto)")
    if plan.graph_pool and room + plan.graph_pool > 0:
        out.append(
            f"--enforce-eager frees the CUDA graph pool's {format_bytes(plan.graph_pool)} (slower decode at small "
            f"batches): room for ~{(room + plan.graph_pool) // per_token} KV tokens"
        )
    for method in ("int8", "int4"):
        if method == quantization or (method == "int8" and quantization == "int4"):
            continue
        try:
            quant = get_quant_method(method)
            weights = weight_breakdown(config, dtype, quant, device_type)
        except ValueError:  # e.g. the default group size does not divide a dimension
            continue
        # Same step sizes, so the workspace differs only by the quantized linears' scratch.
        elem = torch.empty((), dtype=dtype).element_size()
        scratch = (weights.largest_quantized_linear - plan.weights.largest_quantized_linear) * elem
        freed = plan.weights.total - weights.total - scratch
        if freed > 0 and room + freed > 0:
            tokens = (room + freed) // per_token
            out.append(f"--quantization {method} frees {format_bytes(freed)}: room for ~{tokens} KV tokens")
    if kv_cache_dtype == "auto" and room > 0:
        try:
            small = kv_bytes_per_token(config, dtype, "int8")
        except ValueError:  # the codes' float32 scales need a head_dim divisible by 4
            small = per_token
        if small < per_token:
            out.append(
                f"--kv-cache-dtype int8 (or fp8) takes {format_bytes(small)} per token instead of "
                f"{format_bytes(per_token)}: room for ~{room // small} tokens"
            )
    return out
