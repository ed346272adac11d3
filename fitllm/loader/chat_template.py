"""Chat templates rendered with bounds: a checkpoint's template is code from the checkpoint, and one such as
`{{ 'x' * 100000000 }}` froze the server for 41 s at 6 GB. Rendering is bounded in output size and time.

- Jinja's `ImmutableSandboxedEnvironment` (as transformers renders templates: no attribute escapes, no
  mutation of the messages), with every operation that can make a large value checked *before* it runs:
  `*`, `+`, `%`, `**` (string, list and integer blow-ups), `~` and every join of output (`concat`), any call
  or filter given an integer above the limit (`center(10**9)`, `ljust`, `zfill`, format widths), `replace`
  by its worst-case result; every result of a call or filter, and all output (set-blocks included, through
  `finalize`), is counted against the limit.
- Time: a deadline checked at every call, attribute or item access, operator and output, and a watchdog
  that raises in the rendering thread when a loop does none of those (`PyThreadState_SetAsyncExc`; it acts
  between Python bytecodes, which is all a compiled template runs besides the checked operations).

A template that breaks a bound raises `TemplateBoundExceeded` (a `jinja2.TemplateError`) naming the bound.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from jinja2 import Environment, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_MAX_CHARS = 1 << 24  # without a server's prompt limit (fitllm generate --chat, LLM.chat)
DEFAULT_TIMEOUT_S = 10.0
_WIDTH = re.compile(r"\d+")


class TemplateBoundExceeded(TemplateError):
    """The chat template's output or work went past a bound (size or time)."""


class _RenderTimeout(BaseException):
    """Raised asynchronously in the rendering thread by the watchdog (a BaseException, so a template's own
    error handling cannot swallow it)."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` through `environment.bounded_join`, so concatenation is checked like `+`."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox whose renders stay under `max_chars` of any value and output, and under `timeout_s`."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, max_chars: int, timeout_s: float) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize)
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self.deadline = float("inf")
        self.output_chars = 0
        self.concat = self.bounded_join
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # ---- checks ------------------------------------------------------------------------------------
    def _refuse(self, what: str) -> TemplateBoundExceeded:
        return TemplateBoundExceeded(
            f"the chat template {what}, past its limit of {self.max_chars} characters (the prompt limit)"
        )

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBoundExceeded(f"the chat template took longer than {self.timeout_s:g} s to render")

    def _check_result(self, value: Any) -> Any:
        if _size(value) > self.max_chars:
            raise self._refuse(f"made a value of {_size(value)} items")
        return value

    def _check_args(self, args: Iterable[Any]) -> None:
        self.tick()
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_chars:
                raise self._refuse(f"asked for a size of {a}")

    def _finalize(self, value: Any) -> str:
        text = str(value)
        self.output_chars += len(text)
        self.tick()
        if self.output_chars > 4 * self.max_chars:  # set-blocks and output together
            raise self._refuse(f"wrote {self.output_chars} characters")
        return text

    def bounded_join(self, parts: Iterable[Any]) -> str:
        """`~`, set-blocks and the final output: the joined length is checked before joining."""
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        total = sum(len(p) for p in parts)
        self.tick()
        if total > self.max_chars:
            raise self._refuse(f"joined {total} characters")
        return "".join(parts)

    # ---- the sandbox's hooks -----------------------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * max(n, 0) > self.max_chars:
                    raise self._refuse(f"repeated {_size(seq)} items {n} times")
        elif operator == "+" and _size(left) + _size(right) > self.max_chars:
            raise self._refuse(f"added {_size(left)} and {_size(right)} items")
        elif operator == "%" and isinstance(left, str):
            if any(int(w) > self.max_chars for w in _WIDTH.findall(left)):
                raise self._refuse("formatted with a width past the limit")
        elif operator == "**" and _huge_power(left, right):
            raise self._refuse(f"raised {left} to the power {right}")
        return self._check_result(super().call_binop(context, operator, left, right))

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_args((*args, *kwargs.values()))
        name, owner = getattr(__obj, "__name__", ""), getattr(inspect.unwrap(__obj), "__self__", None)
        if name in ("format", "format_map"):  # the sandbox hands str.format out wrapped
            self._check_format(owner)
        if name == "replace" and isinstance(owner, str):
            self._check_replace(owner, *args[:2])
        return self._check_result(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def _check_format(self, fmt: Any) -> None:
        if isinstance(fmt, str) and any(int(w) > self.max_chars for w in _WIDTH.findall(fmt)):
            raise self._refuse("formatted with a width past the limit")

    def _check_replace(self, text: str, old: Any = None, new: Any = None) -> None:
        if isinstance(old, str) and isinstance(new, str):
            worst = len(text) + (text.count(old) if old else len(text) + 1) * len(new)
            if worst > self.max_chars:
                raise self._refuse(f"replaced into up to {worst} characters")

    def _bounded_filter(self, name: str, f: Callable) -> Callable:
        def bounded(*args: Any, **kwargs: Any) -> Any:
            values = [a for a in args if not _is_context(a)]
            self._check_args((*values[1:], *kwargs.values()))
            if name == "replace" and values and isinstance(values[0], str):
                self._check_replace(values[0], *values[1:3])
            if name == "format" and values:
                self._check_format(values[0])
            return self._check_result(f(*args, **kwargs))

        for attr in ("jinja_pass_arg",):  # keep pass_context / pass_environment / pass_eval_context
            if hasattr(f, attr):
                setattr(bounded, attr, getattr(f, attr))
        return bounded

    # ---- rendering ---------------------------------------------------------------------------------
    def render(self, source: str, **variables: Any) -> str:
        """`source` rendered with `variables`, within the bounds (raises TemplateError)."""
        template = self.from_string(source)
        self.output_chars = 0
        self.deadline = time.monotonic() + self.timeout_s
        return _with_watchdog(lambda: self.bounded_join(template.generate(**variables)), self.timeout_s)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` (plain json.dumps), not Jinja's HTML-safe one, which writes `<` as `\\u003c`:
    tool schemas must reach the model as transformers renders them."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _huge_power(base: Any, exp: Any) -> bool:
    """Whether base ** exp is an integer of more than 4096 bits (computing it could take minutes)."""
    ints = isinstance(base, int) and isinstance(exp, int)
    return ints and exp > 0 and abs(base) > 1 and exp * abs(base).bit_length() > 4096


def _is_context(value: Any) -> bool:
    return isinstance(value, Context | nodes.EvalContext | Environment)


def _async_raise(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


def _with_watchdog(fn: Callable[[], str], timeout_s: float) -> str:
    """fn() in this thread; past `timeout_s` (plus a grace for the cooperative deadline) the watchdog raises
    in it. The lock makes the raise happen only while fn runs, and any raise still pending when fn ends is
    cleared before this returns."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"done": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                _async_raise(tid, _RenderTimeout)

    timer = threading.Timer(timeout_s + 0.5, fire)
    timer.daemon = True
    try:
        timer.start()
        try:
            return fn()
        finally:
            with lock:
                state["done"] = True
                _async_raise(tid, None)
            timer.cancel()
    except _RenderTimeout:
        raise TemplateBoundExceeded(f"the chat template took longer than {timeout_s:g} s to render") from None


def render_chat_template(
    source: str,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    raise_exception: Callable[[str], None] | None = None,
    **variables: Any,
) -> str:
    """A chat template rendered within `max_chars` and `timeout_s` (see the module docstring)."""
    env = BoundedEnvironment(max_chars, timeout_s)

    def _raise(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception or _raise
    return env.render(source, **variables)
