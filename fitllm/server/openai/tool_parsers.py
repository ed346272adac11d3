"""Tool calls read back from a model's output, per family, into OpenAI `tool_calls`.

The family is the one the model's chat template teaches (`detect_family`):

- `hermes` (Qwen2.5, Hermes 2/3; vLLM's `hermes` parser): `<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>`, any number of them, after optional text.
- `llama3_json` (Llama 3.1-3.3; vLLM's `llama3_json`): the whole reply is one JSON object `{"name": ...,
  "parameters": {...}}` (or `"arguments"`), optionally after `<|python_tag|>`, several joined by `;`.
- `glm4` (GLM-4-9B-chat, CodeGeeX4): the reply starts with the function's name on its own line, then its
  arguments as JSON (`get_weather\\n{"city": "Paris"}`); CodeGeeX4's function-call demo also reads calls as
  ```json {"name": ..., "arguments": ...}``` blocks, which are taken too.

A reply that looks like a call but does not parse (bad JSON, a name the request did not offer) is returned
as text, as vLLM does: the client sees what the model wrote rather than an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("hermes", "llama3_json", "glm4")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_HERMES_OPEN = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_FENCED = re.compile(r"```json\s*(.*?)\s*```", re.DOTALL)
# GLM-4-9B-chat's template reads the tools from a message (`item['tools']`), not from a `tools` variable.
MESSAGE_TOOLS = re.compile(r"""\[\s*['"]tools['"]\s*\]\s+is\s+defined|\.tools\s+is\s+defined""")


def detect_family(chat_template: str | None) -> str | None:
    """Which tool-call format a chat template teaches its model, or None when it teaches none fitllm reads."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or ("ipython" in t and '"parameters"' in t):
        return "llama3_json"
    if "<|observation|>" in t or (MESSAGE_TOOLS.search(t) and "<|assistant|>" in t):
        return "glm4"
    return None


@dataclass(slots=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def as_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.as_dict()}


@dataclass(slots=True)
class Parsed:
    """A reply split into its text (None when it is only calls) and its calls."""

    content: str | None
    calls: list[ToolCall]


def _call(obj: Any, names: set[str], args_keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, family: str, names: set[str]) -> Parsed:
    """`text` (a finished reply) as content and calls in `family`'s format; all text if no call parses."""
    if family == "hermes":
        calls = [_call(_loads(m), names) for m in _HERMES.findall(text)]
        if not calls or any(c is None for c in calls):
            return Parsed(text, [])
        content = text[: text.index(_HERMES_OPEN)].rstrip()
        return Parsed(content or None, calls)  # type: ignore[arg-type]
    if family == "llama3_json":
        body = text.strip().removeprefix(_PYTHON_TAG).strip()
        if not body.startswith("{"):
            return Parsed(text, [])
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return Parsed(text, [])
            call = _call(obj, names, ("parameters", "arguments"))
            if call is None:
                return Parsed(text, [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return Parsed(None, calls)
    if family == "glm4":
        fenced = _FENCED.findall(text)
        if fenced:
            calls = [_call(_loads(m), names) for m in fenced]
            if all(c is not None for c in calls):
                return Parsed(text[: text.index("```json")].strip() or None, calls)  # type: ignore[arg-type]
        name, _, rest = text.strip().partition("\n")
        args = _loads(rest.strip()) if name.strip() in names else None
        if isinstance(args, dict):
            return Parsed(None, [ToolCall(name.strip(), json.dumps(args, ensure_ascii=False))])
        return Parsed(text, [])
    raise ValueError(f"unknown tool-call family {family!r}")


class ToolCallStream:
    """A streamed reply split as it arrives: text that cannot be (the start of) a call is passed on at once;
    from the point where a call may begin, text is held until the call closes (hermes) or the reply ends
    (the others), then sent as whole calls, one delta each (or as text, if it did not parse)."""

    def __init__(self, family: str, names: set[str]) -> None:
        self.family, self.names = family, names
        self.held = ""  # text not yet passed on
        self.sent_calls = 0
        self.in_call = False  # a call may have begun: hold everything from here
        self.any_calls = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The text to send now and the calls completed by `delta`."""
        self.held += delta
        if self.family == "hermes":
            return self._feed_hermes()
        if self.in_call:
            return "", []
        stripped = self.held.lstrip()
        if not stripped:
            return "", []
        if self.family == "llama3_json":
            maybe = stripped.startswith("{") or _PYTHON_TAG.startswith(stripped[: len(_PYTHON_TAG)])
        else:  # glm4: a first line that is (the start of) an offered name, or a ```json fence
            first, newline, _ = stripped.partition("\n")
            maybe = (first.strip() in self.names) if newline else any(n.startswith(first) for n in self.names)
            maybe = maybe or "```json".startswith(first[:7]) or "```json" in stripped
        if maybe:
            self.in_call = True
            return "", []
        out, self.held = self.held, ""
        return out, []

    def _feed_hermes(self) -> tuple[str, list[ToolCall]]:
        out, calls = "", []
        while True:
            if not self.in_call:
                at = self.held.find(_HERMES_OPEN)
                if at < 0:  # pass on all but a tail that may start the marker, and whitespace before it
                    keep = _partial_suffix(self.held, _HERMES_OPEN)
                    keep += len(self.held[: len(self.held) - keep]) - len(
                        self.held[: len(self.held) - keep].rstrip()
                    )
                    out += self.held[: len(self.held) - keep]
                    self.held = self.held[len(self.held) - keep :]
                    return out, calls
                out += self.held[:at].rstrip()  # as parse_tool_calls: no whitespace before the call
                self.held = self.held[at:]
                self.in_call = True
            end = self.held.find("</tool_call>")
            if end < 0:
                return out, calls
            block = self.held[: end + len("</tool_call>")]
            parsed = parse_tool_calls(block, "hermes", self.names)
            if parsed.calls:
                calls += parsed.calls
                self.any_calls = True
            else:
                out += block
            self.held = self.held[len(block) :].lstrip() if parsed.calls else self.held[len(block) :]
            self.in_call = False

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: what was held, as calls or as text."""
        held, self.held = self.held, ""
        if not held:
            return "", []
        if self.family == "hermes":
            return held, []  # an unclosed <tool_call>: text
        parsed = parse_tool_calls(held, self.family, self.names)
        self.any_calls = self.any_calls or bool(parsed.calls)
        return parsed.content or "", parsed.calls


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolReplies:
    """One chat request's replies with tools: per choice, the streamed split (deltas with text and whole
    calls) and the finished message, in OpenAI's shape; with no family (no tools, or tool_choice "none")
    every reply is plain text."""

    def __init__(self, family: str | None, names: set[str], choices: int) -> None:
        self.family, self.names = family, names
        self.splitters = [ToolCallStream(family, names) if family else None for _ in range(choices)]
        self.sent = [0] * choices  # calls sent per choice (their `index` in the deltas)

    def delta(self, k: int, text: str, finished: bool) -> dict[str, Any]:
        """Choice k's delta for new `text`: text not held back, and the calls it completed."""
        split = self.splitters[k]
        if split is None:
            return {"content": text} if text else {}
        content, calls = split.feed(text)
        if finished:
            more, late = split.finish()
            content, calls = content + more, calls + late
        out: dict[str, Any] = {"content": content} if content else {}
        if calls:
            out["tool_calls"] = [c.as_delta(self.sent[k] + i) for i, c in enumerate(calls)]
            self.sent[k] += len(calls)
        return out

    def finish_reason(self, k: int, reason: str | None) -> str | None:
        """A streamed choice's finish reason: "tool_calls" once it sent calls."""
        return "tool_calls" if reason is not None and self.sent[k] else reason

    def message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A finished reply as the assistant message and its finish reason."""
        if self.family is not None:
            parsed = parse_tool_calls(text, self.family, self.names)
            if parsed.calls:
                calls = [t.as_dict() for t in parsed.calls]
                return {"role": "assistant", "content": parsed.content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, reason
