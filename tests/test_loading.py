"""Loader and request validation: every refusal is a clear error that says what is wrong and what to do."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import pytest
import torch
from conftest import TINY_CONFIG, make_random_checkpoint

from fitllm import Engine, EngineConfig, SamplingParams
from fitllm.loader.checkpoint import CheckpointError
from fitllm.model.registry import supported_architectures


def _engine(folder, **kw) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype="float32", device="cpu", **kw))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One good tiny Llama folder; tests copy it before breaking it."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A private copy of the good checkpoint, free to damage."""
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    return folder


def test_good_checkpoint_loads(checkpoint):
    """The control: the folder the other tests break is itself fine."""
    engine = _engine(checkpoint)
    assert engine.model_config.architecture == "LlamaForCausalLM"
    out = list(engine.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    assert len(out[-1].outputs[0].token_ids) == 3


def test_unknown_architecture_lists_supported_ones(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    cfg["model_type"] = "foo"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        _engine(broken)
    msg = str(info.value)
    assert "FooForCausalLM" in msg
    assert supported_architectures()  # the list itself is not empty
    for arch in supported_architectures():
        assert arch in msg


def test_model_type_alone_is_enough(broken):
    """No `architectures` key: the model_type picks the implementation."""
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["architectures"]
    (broken / "config.json").write_text(json.dumps(cfg))
    assert _engine(broken).model_config.architecture == "LlamaForCausalLM"


def test_missing_config_json(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        _engine(broken)


def test_missing_model_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        _engine(tmp_path / "does-not-exist")


def test_custom_code_only_config_is_refused(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["architectures"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_foo.FooForCausalLM"}
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="custom code"):
        _engine(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        _engine(broken)


def test_missing_shard_is_named(tmp_path):
    folder = make_random_checkpoint(tmp_path, "llama", save_kwargs={"max_shard_size": "20KB"})
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        _engine(folder)


def test_missing_tensor_is_named(broken):
    from safetensors.torch import load_file, save_file

    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.weight"):
        _engine(broken)


def test_wrong_tensor_shape_is_named(broken):
    from safetensors.torch import load_file, save_file

    state = load_file(str(broken / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(TINY_CONFIG["hidden_size"] + 1)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="norm.weight"):
        _engine(broken)


def test_missing_tokenizer_json(broken):
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        _engine(broken)


class _RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_without_running(broken, tmp_path, fmt):
    """A pytorch_model.bin that runs code when unpickled: refused with a CheckpointError, code never runs.

    torch.save writes the zip format today; older checkpoints (and hand-made attacks) are legacy or plain
    pickles, which fitllm reads through a different (non-mmap) path.
    """
    marker = tmp_path / "pwned"
    state = {"model.norm.weight": torch.ones(TINY_CONFIG["hidden_size"]), "evil": _RunsCode(marker)}
    (broken / "model.safetensors").unlink()
    path = broken / "pytorch_model.bin"
    if fmt == "torch-zip":
        torch.save(state, path)
    elif fmt == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match="never executes code"):
        _engine(broken)
    assert not marker.exists(), "the checkpoint's code ran"


def test_pickle_with_non_tensor_values_is_refused(broken):
    (broken / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(4), "step": 3}, broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        _engine(broken)


# ---- request validation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_engine(checkpoint):
    return _engine(checkpoint, max_model_len=8)


def test_prompt_longer_than_max_model_len(short_engine):
    with pytest.raises(ValueError, match="--max-model-len"):
        short_engine.add_request(list(range(3, 11)))  # 8 tokens: no room left for one new token
    with pytest.raises(ValueError, match="--max-model-len"):
        short_engine.add_request(list(range(3, 23)))
    assert not short_engine.has_unfinished_requests()


def test_prompt_one_below_max_model_len_fits_and_stops_at_the_limit(short_engine):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    out = list(short_engine.stream(list(range(3, 10)), params))[-1]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "prompt", [[], [256], [-1], [3, 4, 10**6]], ids=["empty", "vocab", "negative", "huge"]
)
def test_bad_prompt_token_ids(short_engine, prompt):
    with pytest.raises(ValueError):
        short_engine.add_request(prompt)
    assert not short_engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
        {"top_k": -2},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"max_tokens": 0},
        {"min_tokens": 5, "max_tokens": 2},
        {"logprobs": 21},
        {"logit_bias": {3: math.nan}},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_sampling_params(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name.split("_bias")[0]):
        SamplingParams(**kwargs)


def test_sampling_params_mutated_after_construction_are_rechecked(short_engine):
    params = SamplingParams(temperature=0.7)
    params.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        short_engine.add_request([3, 4, 5], params)
    assert not short_engine.has_unfinished_requests()


def test_valid_edge_sampling_params_are_accepted():
    for kwargs in ({"temperature": 0.0}, {"top_p": 1.0}, {"top_k": -1}, {"min_p": 0.0}, {"max_tokens": None}):
        SamplingParams(**kwargs)
