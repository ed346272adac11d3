"""Weight quantization: how a linear layer stores and multiplies its weight (`--quantization`).

A `QuantMethod` decides three things for every decoder linear (q/k/v, o, gate/up, down): which parameters
the layer holds (so building the model on the meta device gives the planner exact bytes), how a checkpoint
tensor's rows are quantized as they arrive (so loading never holds more than one tensor in float on top of
the final weights), and the matmul.
The LM head (and an embedding tied to it) has a method of its own, `QuantMethod.head` (`--lm-head-dtype`):
int8 per vocabulary row by default when the decoder is quantized (`head_method`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from fitllm.config import LM_HEAD_DTYPES, QUANTIZATIONS, EngineConfig, ModelConfig
from fitllm.quant.base import QuantMethod, UnquantizedMethod
from fitllm.quant.gguf_blocks import BLOCK
from fitllm.quant.int4 import Int4Method
from fitllm.quant.int8 import Int8Method

if TYPE_CHECKING:  # a type only: the loader imports this package
    from fitllm.loader import ModelSource

DEFAULT_INT4_GROUP_SIZE = 64  # for float checkpoints


def default_group_size(source_block_type: str | None) -> int:
    """int4's group size when --quant-group-size is not given: the checkpoint's own when its linears are
    GGUF 4-bit blocks (Q4_0/Q4_1, 32), so they load as they are instead of being rounded onto a second,
    coarser grid (on the default model: perplexity +0.01% instead of +22.8% at group 64); else 64."""
    return BLOCK if source_block_type in Int4Method(BLOCK).block_types() else DEFAULT_INT4_GROUP_SIZE


def linear_in_features(config: ModelConfig) -> tuple[int, ...]:
    """The input widths of a decoder's quantized linears (q/k/v and gate/up, o, down)."""
    return (config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size)


def get_quant_method(
    name: str | None,
    group_size: int | None = None,
    source_block_type: str | None = None,
    config: ModelConfig | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    lm_head_dtype: str = "auto",
) -> QuantMethod:
    """The method for `--quantization NAME` (None or 'none': the model dtype), its `head` chosen by
    `--lm-head-dtype` (`head_method`); `source_block_type` (see ModelSource.linear_block_type) picks int4's
    default group size; `config`, if given, lets an invalid group size's error suggest sizes that fit the
    model; `device` (and the model `dtype`), if given, are where bitsandbytes must run (checked now, see
    fitllm/quant/bnb.py)."""
    if source_block_type is None and config is not None:
        source_block_type = config.linear_block_type  # a GGUF's, kept on its ModelConfig
    name = resolve_quantization(name, source_block_type)
    method = _decoder_method(name, group_size, source_block_type, config, device, dtype)
    method.head = head_method(name, lm_head_dtype, method)
    return method


def engine_quant_method(
    config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> QuantMethod:
    """The method an engine's flags name for its model (--quantization, --quant-group-size,
    --lm-head-dtype): the one rank 0 and every tensor-parallel worker build their layers with."""
    return get_quant_method(
        config.quantization,
        config.quant_group_size,
        config=model_config,
        device=device,
        dtype=dtype,
        lm_head_dtype=config.lm_head_dtype,
    )


# `--quantization auto`: the method that holds a GGUF's own linear codes (gguf_blocks.py), by their type.
AUTO_FROM_GGUF = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


def resolve_quantization(name: str | None, source_block_type: str | None) -> str | None:
    """`--quantization`, with auto resolved from the checkpoint's decoder linears (`source_block_type`,
    ModelSource.linear_block_type): a GGUF of Q4_0 / Q4_1 linears runs as int4 (their codes kept), of Q8_0
    as int8, anything else (float GGUF, mixed types, safetensors) in the model dtype. Why a default of
    auto: llama.cpp, KoboldCpp and vLLM run a GGUF in its own quantization, and its users compare on that
    (the default model decodes 2.5x faster on CPU as int4 than dequantized, with a third of the weights)."""
    if name != "auto":
        return name
    return AUTO_FROM_GGUF.get(source_block_type or "", "none")


def resolve_config(config: EngineConfig, source: ModelSource) -> EngineConfig:
    """`config` with --quantization auto resolved for `source`: what the engine, its tensor-parallel workers
    and `fitllm plan` run."""
    if config.quantization != "auto":
        return config
    resolved = resolve_quantization("auto", source.config.linear_block_type)  # kept there by open_model
    return dataclasses.replace(config, quantization=resolved)


def head_method(quantization: str | None, lm_head_dtype: str, decoder: QuantMethod) -> QuantMethod | None:
    """`--lm-head-dtype`: the LM head's method, None for the model dtype. auto is int8 when the decoder is
    quantized: on the default model the bfloat16 head is 56 MB of reads per token, as much as all the int4
    decoder linears together; int8 per vocabulary row halves it (its perplexity cost: docs/benchmarks.md).
    The head shares the decoder's scratch (int8's or int4's: the planner counts one) and converts its large
    calls a slice at a time."""
    if lm_head_dtype not in LM_HEAD_DTYPES:
        raise ValueError(f"--lm-head-dtype must be one of {', '.join(LM_HEAD_DTYPES)}; got {lm_head_dtype!r}")
    if lm_head_dtype == "model" or (lm_head_dtype == "auto" and quantization in (None, "none")):
        return None
    return Int8Method(chunked=True, scratch=getattr(decoder, "scratch", None))


def _decoder_method(
    name: str | None,
    group_size: int | None,
    source_block_type: str | None,
    config: ModelConfig | None,
    device: torch.device | None,
    dtype: torch.dtype,
) -> QuantMethod:
    if name in (None, "none"):
        return UnquantizedMethod()
    if name == "int8":
        return Int8Method()
    if name == "int4":
        dims = linear_in_features(config) if config is not None else ()
        return Int4Method(group_size or default_group_size(source_block_type), dims)
    if name in ("bnb-int8", "bnb-nf4"):
        from fitllm.quant.bnb import BnbInt8Method, BnbNF4Method

        method = BnbInt8Method() if name == "bnb-int8" else BnbNF4Method()
        if device is not None:
            method.check_device(device, dtype)
        return method
    raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {name!r}")


def graph_safe(name: str | None) -> bool:
    """Whether `--quantization NAME`'s matmul can be captured in a CUDA graph. bnb-int8 cannot: LLM.int8()
    looks for outlier activation columns on every call (`outliers.any()`, `argwhere`), a host sync and a
    data-dependent shape, so with it decode runs eagerly (vLLM does the same for bitsandbytes 8-bit)."""
    return name != "bnb-int8"


__all__ = [
    "QUANTIZATIONS",
    "QuantMethod",
    "UnquantizedMethod",
    "get_quant_method",
    "graph_safe",
    "head_method",
    "resolve_config",
    "resolve_quantization",
]
