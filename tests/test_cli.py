"""Every command's --help renders (argparse formats help strings with %, so a stray one breaks it)."""

from __future__ import annotations

import argparse

import pytest

from fitllm.cli import build_parser, main


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
