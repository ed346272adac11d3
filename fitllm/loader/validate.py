"""Checkpoints that lie: every size a config states is checked on its own (positive, consistent, within
bounds) and then against the tensors the file actually holds, before anything is built or allocated.

Errors name the field as the checkpoint spells it (`num_hidden_layers`, GGUF `llama.block_count`,
ChatGLM `num_layers`) and both numbers where two disagree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fitllm.config import ModelConfig

# Far above any published model (the largest have ~130 layers, hidden 16-25k, vocabularies of 256k), and
# low enough that what a config implies can be counted (and the planner's loops run) in moments.
LIMITS = {
    "num_hidden_layers": 1 << 14,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 14,
    "vocab_size": 1 << 22,
}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Names(dict):
    def __missing__(self, key: str) -> str:
        return key


class ConfigError(ValueError):
    """A config field that is missing, out of range or contradicted by the file. `template` names fields
    as `{hidden_size}`; `renamed` spells them as the checkpoint does."""

    def __init__(self, template: str, names: Mapping[str, str] | None = None) -> None:
        super().__init__(template)
        self.template = template
        self.names = dict(names or {})

    def renamed(self, names: Mapping[str, str]) -> ConfigError:
        return ConfigError(self.template, names)

    def __str__(self) -> str:
        return self.template.format_map(_Names(self.names))


def _shown(value: Any) -> str:
    return repr(value).replace("{", "{{").replace("}", "}}")


def positive_int(cfg: Mapping[str, Any], key: str, default: Any = None) -> int:
    """cfg[key] as a positive int (within LIMITS where it has one), or a ConfigError naming it."""
    value = cfg.get(key)
    if value is None:
        value = default
    if value is None:
        raise ConfigError(f"{{{key}}} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{{{key}}} is {_shown(value)}; expected a positive integer")
    if value < 1:
        raise ConfigError(f"{{{key}}} is {value}; expected a positive integer")
    limit = LIMITS.get(key)
    if limit is not None and value > limit:
        raise ConfigError(f"{{{key}}} is {value}; fitllm accepts at most {limit}")
    return value


def finite_number(cfg: Mapping[str, Any], key: str, default: float, minimum: float = 0.0) -> float:
    """cfg[key] as a finite float >= minimum (the default when absent)."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{{{key}}} is {_shown(value)}; expected a finite number")
    if value < minimum:
        raise ConfigError(f"{{{key}}} is {value}; expected at least {minimum}")
    return float(value)


def check_model_config(config: ModelConfig) -> None:
    """What ties the fields together: heads share KV heads evenly; rotary turns channel pairs."""
    c = config
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(
            f"{{num_attention_heads}} ({c.num_attention_heads}) is not a multiple of "
            f"{{num_key_value_heads}} ({c.num_key_value_heads})"
        )
    if not 0 < c.partial_rotary_factor <= 1:
        raise ConfigError(f"{{partial_rotary_factor}} is {c.partial_rotary_factor}; expected (0, 1]")
    rotary = int(c.head_dim * c.partial_rotary_factor)
    if c.architecture != "XGLMForCausalLM" and (rotary < 2 or rotary % 2):
        raise ConfigError(f"{{head_dim}} is {c.head_dim}: rotary needs an even number of channels per head")
    if c.sliding_window is not None:
        positive_int({"sliding_window": c.sliding_window}, "sliding_window")
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "freq_factors":
        count = len(c.rope_scaling.get("factors") or ())
        if count != rotary // 2:
            raise ConfigError(
                f"{{rope_scaling}} has {count} rope_freqs factors, but {{head_dim}} {c.head_dim} rotates "
                f"{rotary} channels and needs {rotary // 2}"
            )
    if c.rope_scaling and c.rope_scaling.get("rope_type") in ("linear", "llama3"):
        factor = c.rope_scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
            raise ConfigError(f"{{rope_scaling}} factor is {_shown(factor)}; expected a positive number")


def check_tensor_shapes(config: ModelConfig, tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """`tensors`: Hugging Face name -> (name in the file, shape), read from the file's headers. The layer
    count must be the config's, every layer's tensors shaped as layer 0's, and layer 0's and the global
    tensors as the config implies: the model's own `load_weights` runs on meta tensors (no memory) over a
    one-layer build, so every family's name mapping and fused shards are checked as a real load checks them."""
    from fitllm.model.linear import ShapeMismatch
    from fitllm.model.registry import build_on_meta

    layers: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, entry in tensors.items():
        m = _LAYER.search(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[name[m.end() :]] = entry
    found = sorted(layers)
    if found != list(range(config.num_hidden_layers)):
        numbering = f" (numbered up to {found[-1]})" if found and found[-1] != len(found) - 1 else ""
        raise ConfigError(
            f"{{num_hidden_layers}} is {config.num_hidden_layers} but the checkpoint holds tensors for "
            f"{len(found)} decoder layers{numbering}"
        )
    first = layers[0]
    for index in found[1:]:
        for suffix, (file_name, shape) in layers[index].items():
            if suffix in first and first[suffix][1] != shape:
                raise ConfigError(
                    f"tensor {_shown(file_name)} has shape {shape}, but layer 0's {_shown(first[suffix][0])} "
                    f"has {first[suffix][1]}"
                )
    checked = sorted(
        ((n, e) for n, e in tensors.items() if not (m := _LAYER.search(n)) or m.group(1) == "0"),
        key=lambda item: "embed" not in item[0],  # vocabulary and hidden size first: every tensor has one
    )
    current: list[str] = []

    def meta_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, (file_name, shape) in checked:
            current[:] = [file_name]
            yield name, torch.empty(shape, device="meta")

    model = build_on_meta(dataclasses.replace(config, num_hidden_layers=1), torch.float32)
    try:
        model.load_weights(meta_tensors())
    except ShapeMismatch as exc:
        raise ConfigError(
            f"tensor {_shown(current[0])} has shape {exc.got}, but the config implies {exc.expected}"
            + _implied_by(config, exc.got, exc.expected)
        ) from None


def _implied_by(config: ModelConfig, got: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """The config fields behind the dimensions that disagree, e.g. ' ({intermediate_size} is 256)'."""
    c = config
    dims = {
        "{vocab_size}": c.vocab_size,
        "{hidden_size}": c.hidden_size,
        "{intermediate_size}": c.intermediate_size,
        "{num_attention_heads} x {head_dim}": c.num_attention_heads * c.head_dim,
        "{num_key_value_heads} x {head_dim}": c.num_key_value_heads * c.head_dim,
    }
    wrong = {e for g, e in zip(got, expected, strict=False) if g != e}
    named = [f"{label} is {value}" for label, value in dims.items() if value in wrong]
    return f" ({', '.join(named)})" if named else ""
