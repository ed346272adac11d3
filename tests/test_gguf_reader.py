"""fitllm's GGUF reader (fitllm/loader/gguf_reader.py) against the `gguf` library's reader on the same files:
every metadata value, every tensor's name, shape, type and bytes; and the memory property it exists for: no
mapping of the file outlives opening it, and reading tensors adds no file pages to the process."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import write_random_gguf

from fitllm.loader import default_model_path, open_model
from fitllm.loader.gguf_file import read_gguf


def _default_model() -> Path:
    try:
        return default_model_path()
    except Exception as exc:  # noqa: BLE001 (the wheel is optional for this module's other tests)
        pytest.skip(f"default model not installed: {exc}")


def _files(tmp_path: Path) -> list[Path]:
    mixed = tmp_path / "q4_1.gguf"
    write_random_gguf(mixed, "Q4_1", num_hidden_layers=2)  # Q4_1 linears, float32 norms and embeddings
    q8 = tmp_path / "q8_0.gguf"
    write_random_gguf(q8, "Q8_0", num_hidden_layers=1)
    return [mixed, q8, _default_model()]


def _assert_same_as_the_library(path: Path) -> None:
    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    try:
        library_fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert ours.fields.keys() == library_fields.keys()
        for key, value in library_fields.items():
            assert ours.fields[key] == value, key
            assert type(ours.fields[key]) is type(value), key
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
            assert mine.shape == tuple(int(d) for d in ref.shape), mine.name
            assert mine.tensor_type == ref.tensor_type, mine.name
            assert mine.n_bytes == ref.n_bytes and mine.offset == ref.data_offset, mine.name
            data = ours.read(mine)
            assert data.dtype == ref.data.dtype and data.shape == ref.data.shape, mine.name
            assert np.array_equal(data, ref.data), mine.name
            assert data.flags.writeable  # the caller's own memory, not a read-only view of a map
    finally:
        ours.close()


def test_reader_matches_the_gguf_library(tmp_path):
    for path in _files(tmp_path):
        _assert_same_as_the_library(path)


def _mapped(path: Path) -> list[str]:
    target = str(path.resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(target)]


def test_the_loader_maps_no_gguf_pages(tmp_path):
    """Opening, reading every tensor and the tokenizer leave no mapping of the file: its pages never count in
    the process's RSS or its peak (the library's reader mapped the whole file: 94 MiB of the default model
    in VmHWM during the load)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    path = _default_model()
    source = open_model(str(path))
    assert _mapped(path) == []
    source.tokenizer()
    for _ in source.weights(as_blocks=True):
        assert _mapped(path) == []
    source.release()


def test_a_closed_file_refuses_reads(tmp_path):
    path = _files(tmp_path)[0]
    reader = read_gguf(path)
    tensor = reader.tensors[0]
    reader.close()
    with pytest.raises(ValueError, match="closed after loading"):
        reader.read(tensor)
