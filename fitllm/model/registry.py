"""Architecture name in a checkpoint's config -> the class that implements it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fitllm.config import ModelConfig
    from fitllm.quant.base import QuantMethod

# HF `architectures[0]` -> fitllm model class path.
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "fitllm.model.llama:LlamaForCausalLM",
    "MistralForCausalLM": "fitllm.model.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "fitllm.model.llama:LlamaForCausalLM",
    # GLM-4 (transformers' native layout): Llama's block with q/k/v bias, fused gate_up and half, interleaved rotary.
    "GlmForCausalLM": "fitllm.model.llama:LlamaForCausalLM",
    "XGLMForCausalLM": "fitllm.model.xglm:XGLMForCausalLM",  # fairseq-dense
}
# `model_type` (or GGUF general.architecture) -> HF architecture, for configs without `architectures`.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "smollm": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "glm": "GlmForCausalLM",
    "xglm": "XGLMForCausalLM",
}


def supported_architectures() -> list[str]:
    """Names a user can look for in config.json."""
    return sorted(_ARCHITECTURES)


def resolve_architecture(cfg: dict[str, Any]) -> str:
    """Pick the architecture name from a config dict, or explain which ones fitllm knows."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCHITECTURES:
            return arch
    model_type = cfg.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    remote = (
        " (its config points at its own modelling code, auto_map; fitllm never executes code from a checkpoint)"
        if cfg.get("auto_map")
        else ""
    )
    raise ValueError(
        f"unsupported architecture {named}{remote}; fitllm supports: {', '.join(supported_architectures())}"
    )


def model_class(architecture: str) -> type[nn.Module]:
    """Import and return the class for an architecture name."""
    import importlib

    module_name, _, cls_name = _ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block (parameters are created in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_on_meta(config: ModelConfig, dtype: torch.dtype, quant: QuantMethod | None = None) -> nn.Module:
    """The model for `config` on the meta device, parameters in `dtype` (or as `quant` stores them): shapes
    and bytes without memory. The loader allocates it; the planner counts it."""
    with default_dtype(dtype), torch.device("meta"):
        return model_class(config.architecture)(config, quant)
