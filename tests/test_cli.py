"""Every command's --help renders (argparse formats help strings with %, so a stray one breaks it); the
engine flags are generated from EngineConfig's fields and round-trip into it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import fields

import pytest

from fitllm.args import engine_config_from_args
from fitllm.cli import build_parser, main
from fitllm.config import EngineConfig
from fitllm.flags import field_choices, flag_fields, flag_name
from fitllm.quant import QUANTIZATIONS


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_command_tree_is_complete():
    names = {" ".join(c) for c in COMMANDS}
    assert {"generate", "serve", "plan", "bench throughput", "bench offload", "eval perplexity"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fitllm")
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: fitllm" in capsys.readouterr().out


def _engine_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    group = next(g for g in parser._action_groups if g.title == "engine")
    return {a.dest: a for a in group._group_actions}


def _subparser(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_every_engine_config_field_is_a_flag_with_its_default_and_choices():
    flags = _engine_flags(_subparser("serve"))
    flagged = flag_fields(EngineConfig)
    assert {f.name for f in fields(EngineConfig)} - {f.name for f in flagged} == {"profile_workspace"}
    assert set(flags) == {f.name for f in flagged}
    for f in flagged:
        action = flags[f.name]
        assert action.option_strings[0] == flag_name(f)
        assert action.default == f.default, f.name
        assert action.choices == (None if field_choices(f) is None else list(field_choices(f))), f.name
        assert action.help == f.metadata["help"]
    assert flags["num_threads"].option_strings == ["--threads"]
    assert flags["quantization"].choices == list(QUANTIZATIONS)


@pytest.mark.parametrize(
    ("command", "rest"),
    [(("serve",), []), (("plan",), []), (("generate",), ["hi"]), (("eval", "perplexity"), ["--text", "t"]),
     (("bench", "step"), [])],
    ids=lambda c: " ".join(c),
)  # fmt: skip
def test_every_engine_command_takes_the_same_engine_flags_and_defaults(command, rest):
    """serve, plan, generate, eval and the engine benchmarks share one generated group; no flags, no
    change from EngineConfig's defaults."""
    assert _engine_flags(_subparser(*command)).keys() == _engine_flags(_subparser("serve")).keys()
    assert engine_config_from_args(build_parser().parse_args([*command, *rest])) == EngineConfig()


def test_plan_passes_the_attention_backend_on_and_takes_the_static_kv_flags(capsys):
    """fitllm plan takes serve's --attention-backend (the torch reference captures no CUDA graphs),
    --static-kv and --kv-cache-memory."""
    args = ["plan", "--device", "cuda", "--memory-budget", "2GiB", "--dtype", "bfloat16", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["graph_pool"] > 0
    assert main([*args, "--attention-backend", "torch"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_pool"] == 0
    assert main([*args, "--static-kv", "--kv-cache-memory", "256MiB"]) == 0


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--kv-cache-memory", "512MiB"], {"kv_cache_memory": 512 << 20}),
        (["--swap-space", "1.5GiB", "--kv-slab-size", "2MiB"], {"swap_space": 3 << 29, "kv_slab_size": 2 << 20}),
        (["--max-model-len", "auto"], {"max_model_len": "auto"}),
        (["--max-model-len", "4096"], {"max_model_len": 4096}),
        (["--memory-budget", "0.5"], {"memory_budget": "0.5"}),
        (["--no-enable-prefix-caching", "--static-kv", "--enforce-eager"],
         {"enable_prefix_caching": False, "static_kv": True, "enforce_eager": True}),
        (["--enable-prefix-caching"], {"enable_prefix_caching": True}),
        (["--threads", "3", "--cpu-offload-gb", "0.25", "--quant-group-size", "32"],
         {"num_threads": 3, "cpu_offload_gb": 0.25, "quant_group_size": 32}),
        (["--attention-backend", "torch", "--quantization", "int8", "--kv-cache-dtype", "int8"],
         {"attention_backend": "torch", "quantization": "int8", "kv_cache_dtype": "int8"}),
    ],
)  # fmt: skip
def test_engine_flags_round_trip_into_the_config(argv, want):
    for command in (["serve"], ["plan"]):
        config = engine_config_from_args(build_parser().parse_args([*command, *argv]))
        assert config == dataclasses.replace(EngineConfig(), **want)


@pytest.mark.parametrize(
    "argv", [["--max-model-len", "1"], ["--preemption-mode", "never"], ["--kv-slab-size", "lots"]]
)
def test_bad_engine_flags_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *argv])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_config_validation_reads_the_choices_from_the_fields():
    with pytest.raises(ValueError, match="--preemption-mode must be one of auto, swap, recompute; got 'x'"):
        EngineConfig(preemption_mode="x")
    with pytest.raises(ValueError, match="--async-scheduling must be one of auto, on, off"):
        EngineConfig(async_scheduling="sometimes")
