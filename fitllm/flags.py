"""Dataclass fields that are also command-line flags: each field carries its help, choices, parser and flag
name, and the flags and the dataclass built back from parsed arguments are generated from them (EngineConfig's
engine flags: fitllm/args.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any

Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def flag(
    default: Any,
    help: str,
    *,
    choices: Choices | None = None,
    type: Callable[[str], Any] | None = None,
    name: str | None = None,
) -> Any:
    """A field that is also a flag: its default, help, choices (or a function returning them, where the
    list lives above the dataclass's module), parser (`type`; by default int or float as the default is,
    else str) and name (by default --field-name). A bool defaulting to False is a switch (store_true); one
    defaulting to True also takes --no-NAME."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type, "flag": name})


def flag_fields(cls: type) -> list[Field]:
    """The fields of dataclass `cls` that are flags, in order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_name(f: Field) -> str:
    """The field's flag, e.g. --max-model-len."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def field_choices(f: Field) -> tuple[str, ...] | None:
    """The values the field's flag allows (None: any its parser takes)."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def add_flags(group: argparse._ActionsContainer, cls: type) -> None:
    """One argument per flag field of dataclass `cls`, stored under the field's name."""
    for f in flag_fields(cls):
        assert f.default is not MISSING, f"flag {f.name} needs a default"
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            parse = f.metadata["type"] or (type(f.default) if isinstance(f.default, int | float) else None)
            if parse is not None:
                kw["type"] = parse
            if (choices := field_choices(f)) is not None:
                kw["choices"] = list(choices)
        group.add_argument(flag_name(f), **kw)


def values_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flag fields' values in parsed arguments, by field name: `cls(**values_from_args(cls, args))`."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls)}


def check_choices(obj: Any, *names: str) -> None:
    """Refuse a value of the named flag fields of dataclass instance `obj` that its flag would not take."""
    by_name = {f.name: f for f in fields(obj)}
    for name in names:
        f, value = by_name[name], getattr(obj, name)
        choices = field_choices(f)
        if choices is not None and value not in choices:
            raise ValueError(f"{flag_name(f)} must be one of {', '.join(choices)}; got {value!r}")
