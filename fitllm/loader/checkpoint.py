"""Hugging Face folders: config.json + safetensors (sharded or not) or safe-pickle .bin files."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with what to do about it."""


def read_hf_config(folder: Path) -> dict:
    """config.json as a dict, or a clear error naming the missing file."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    cfg = json.loads(path.read_text())
    if cfg.get("auto_map") and not cfg.get("architectures"):
        raise CheckpointError(
            f"{folder} only describes custom code (auto_map); fitllm never runs code from a checkpoint"
        )
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files in load order: safetensors preferred, pickles read safely."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors, a sharded *.safetensors index, or pytorch_model.bin"
    )


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """name -> (name, shape) of every tensor, read from the safetensors headers alone (no tensor data);
    None when a shard is a pickle, whose shapes cannot be read without unpickling it."""
    if any(path.suffix != ".safetensors" for path in files):
        return None
    from safetensors import safe_open

    out = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out[name] = (name, tuple(f.get_slice(name).get_shape()))
        except Exception as exc:  # SafetensorError and friends: a header that cannot be read
            raise CheckpointError(f"{path} is not a usable safetensors file: {exc}") from None
    return out


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time; the caller copies each into its parameter and drops it."""
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        else:
            yield from _load_pickle_safely(path).items()


def _load_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    """torch.load restricted to tensors and plain containers; memory-mapped so shards are not copied."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Old (pre-zipfile) pickles cannot be memory-mapped; they are still read with weights_only.
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} needs more than tensors to unpickle and fitllm never executes code from a checkpoint; "
            f"convert it to safetensors first ({str(exc).splitlines()[0]})"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state
