"""ModelConfig (one normalised view of every family's config.json) and EngineConfig (all knobs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of KV cache one token occupies across all layers (K and V, every KV head)."""
        elements = self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim
        return elements * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face config.json (Llama, Mistral, Qwen2, SmolLM, GLM-4)."""
        from fitllm.loader.chatglm import chatglm_to_glm_config, is_chatglm
        from fitllm.model.registry import resolve_architecture

        if is_chatglm(cfg):
            cfg = chatglm_to_glm_config(cfg)
        if cfg.get("model_type") == "xglm":
            cfg = _xglm_config(cfg)
        architecture = resolve_architecture(cfg)
        model_type = cfg.get("model_type", "llama")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
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
                for i in range(cfg["num_hidden_layers"])
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
        return cls(
            architecture=architecture,
            model_type=model_type,
            hidden_size=hidden,
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding_window,
            hidden_act=cfg.get("hidden_act", "silu"),
            partial_rotary_factor=float(partial_rotary if partial_rotary is not None else 1.0),
            rope_interleaved=model_type == "glm",
            scale_embedding=bool(cfg.get("scale_embedding", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
        )


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
        head_dim=d // heads,
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


@dataclass(slots=True)
class EngineConfig:
    """Every engine knob; names follow vLLM where the concept is the same."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | str | None = None  # None: the model's context; "auto": the largest the budget holds
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; None: enough for max_num_seqs full contexts, capped
    memory_budget: str | int | None = None  # bytes, '12GiB', or a fraction of free memory; None: 0.8 of free
    static_kv: bool = False  # allocate the whole KV pool up front (the static alternative, for comparison)
    kv_slab_size: int | None = (
        None  # bytes per KV slab of the elastic pool; None: by device (resolve_kv_slab_size)
    )
    kv_idle_release_s: float = 30.0  # give back a KV slab no request has used for this long
    quantization: str | None = None  # None / "none", "int8", "int4", "bnb-int8", "bnb-nf4" (fitllm/quant)
    quant_group_size: int | None = None  # int4 group size (default 64; 32 for GGUF Q4_0/Q4_1 linears)
    kv_cache_dtype: str = "auto"  # auto (model dtype), int8 or fp8 (fitllm/quant/kv.py)
    swap_space: int | None = None  # host bytes for swapped-out KV; None: 4 GiB on CUDA, 0 on CPU
    preemption_mode: str = "auto"  # auto (cheaper of swap and recompute) | swap | recompute
    cpu_offload_gb: float = 0.0  # GiB of decoder layers to offload even when they fit (0: only if they must)
    offload_prefetch: int = 2  # offloaded layers in flight at once (staging buffers)
    offload_dir: str | None = None  # CPU tier: folder for the offload file (None: the temp folder)
    attention_backend: str = "auto"  # auto | torch | triton (fitllm/model/attention.py)
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    async_scheduling: str = "auto"  # auto (on for CUDA) | on | off: schedule step N+1 while step N runs
    profile_workspace: bool = True  # measure the workspace with a profile step at start and reserve that
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a positive power of two; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"--max-num-batched-tokens must be at least 1; got {self.max_num_batched_tokens}"
            )
        if self.async_scheduling not in ASYNC_SCHEDULING:
            raise ValueError(
                f"--async-scheduling must be one of {', '.join(ASYNC_SCHEDULING)}; got {self.async_scheduling!r}"
            )
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError(
                f"--preemption-mode must be auto, swap or recompute; got {self.preemption_mode!r}"
            )
        from fitllm.quant.kv import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.swap_space is not None and self.swap_space < 0:
            raise ValueError(f"--swap-space must be non-negative; got {self.swap_space}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"--cpu-offload-gb must be non-negative; got {self.cpu_offload_gb}")
        if self.offload_prefetch < 1:
            raise ValueError(f"--offload-prefetch must be at least 1; got {self.offload_prefetch}")
        if self.max_model_len == "auto":
            pass
        elif self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ValueError(f"--max-model-len must be at least 2; got {self.max_model_len}")

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


ASYNC_SCHEDULING = ("auto", "on", "off")


def resolve_async_scheduling(name: str, device: torch.device) -> bool:
    """`--async-scheduling`: auto is on for CUDA, where kernels run while the host prepares the next step,
    and off on CPU, where the model runs on the host thread and there is nothing to overlap."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


__all__ = ["ModelConfig", "EngineConfig", "resolve_dtype", "cdiv"]
