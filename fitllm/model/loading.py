"""Copying one checkpoint tensor into a model parameter, shared by every model's `load_weights`."""

from __future__ import annotations

import torch
from torch import nn

from fitllm.model.linear import ShapeMismatch
from fitllm.quant.gguf_blocks import GGUFBlocks, row_chunks


def load_parameter(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    name: str,
    tensor: torch.Tensor | GGUFBlocks,
    shard: object = None,
) -> None:
    """Put `tensor` into parameter `name`: the owning module's `weight_loader` decides how a sharded or
    fused parameter takes it (and quantizes it); any other parameter is shape-checked and copied, GGUF
    blocks dequantized a chunk of rows at a time."""
    owner = model.get_submodule(name.rpartition(".")[0])
    loader = getattr(owner, "weight_loader", None)
    if loader is not None:
        loader(params[name], tensor, shard)
    elif tuple(params[name].shape) != tuple(tensor.shape):
        raise ShapeMismatch(tuple(tensor.shape), tuple(params[name].shape), name)
    elif isinstance(tensor, GGUFBlocks):
        for start, rows in row_chunks(tensor):
            params[name].data.narrow(0, start, rows.shape[0]).copy_(rows)
    else:
        params[name].data.copy_(tensor)
