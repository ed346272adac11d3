"""The base of every route's request body: unknown fields allowed (front ends send several backends'
fields in one body), and every string in it valid Unicode.

JSON can spell a lone UTF-16 surrogate (`"a\\ud800b"`); Python decodes it into a str that no tokenizer, and
no UTF-8 encoder, accepts. Such a body is a 400 naming the field, checked once over the whole body before
any field is used.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from fitllm.server.errors import bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad(text: str) -> str | None:
    """The first lone surrogate in `text` (a valid pair cannot come out of JSON decoding), or None."""
    if text.isascii():
        return None
    m = _SURROGATE.search(text)
    return None if m is None else m.group()


def _path(node: tuple | None) -> list[str]:
    parts: list[str] = []
    while node is not None:
        node, key = node
        # a key may hold the surrogate itself: escaped, so that the error message is valid Unicode
        parts.append(
            f"[{key}]" if isinstance(key, int) else "." + key.encode("ascii", "backslashreplace").decode()
        )
    return parts[::-1]


def check_unicode(data: Any) -> None:
    """400 naming where in `data` (parsed JSON) a string holds a lone surrogate; iterative, so any depth
    json.loads accepted is fine."""
    stack: list[tuple[Any, tuple | None]] = [(data, None)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            bad = _bad(value)
        elif isinstance(value, dict):
            bad = None
            for k, v in value.items():
                if isinstance(k, str) and (bad := _bad(k)) is not None:
                    where = (where, k)
                    break
                if isinstance(v, str | dict | list):
                    stack.append((v, (where, k)))
        elif isinstance(value, list):
            bad = None
            stack.extend((v, (where, i)) for i, v in enumerate(value) if isinstance(v, str | dict | list))
        else:
            continue
        if bad is not None:
            parts = _path(where)
            name = "".join(parts).lstrip(".") or "body"
            raise bad_request(
                f"{name}: the text holds a lone UTF-16 surrogate ({bad.encode('unicode_escape').decode()}), "
                f"which is not valid Unicode",
                parts[0].lstrip(".") if parts else None,
            )


class Body(BaseModel):
    """A request body (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data
