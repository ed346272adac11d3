"""The request side of tool calling on /v1/chat/completions: `tools` and `tool_choice` checked, messages with
tool calls and tool results put in the shape chat templates read, and the grammar that `tool_choice`
"required" or a named function puts on the output.

Tools are rendered through the model's own template (as transformers passes them, `tools=`), and the reply is
parsed per family (tool_parsers.py); `none` still shows the template the tools (as vLLM does) but never
parses a call; `required` and a named function constrain the output to one call in the family's own wrapper
(`forced_call_output`: a grammar the engine's structured output enforces, engine/structured/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fitllm.engine.structured.spec import JSON_OPTIONS, StructuredOutput
from fitllm.server.errors import bad_request
from fitllm.server.openai.tool_parsers import FAMILIES, MESSAGE_TOOLS, detect_family


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A request's validated tools and its tool_choice ("auto", "none", "required", or a function name)."""

    tools: list[dict[str, Any]]
    choice: str
    forced_name: str | None = None  # tool_choice {"type": "function", "function": {"name": ...}}

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"


def read_tools(extra: dict[str, Any]) -> ToolRequest | None:
    """The request's tools (from the body's extra fields), checked as OpenAI checks them; None without any."""
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {type: function, function: {name, parameters}}", "tools")
    seen = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}] must be {{type: function, function: {{name, ...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise bad_request(f"tools[{i}].function.name must be a string of 1-64 characters", "tools")
        if name in seen:
            raise bad_request(f"tools: the function {name!r} is given twice", "tools")
        seen.add(name)
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    if choice is None:
        return ToolRequest(tools, "auto")
    if choice in ("auto", "none", "required"):
        return ToolRequest(tools, choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in seen:
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not in tools", "tool_choice"
            )
        return ToolRequest(tools, "function", name)
    raise bad_request(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def tool_family(chat_template: str | None) -> str:
    """The model's tool-call family, or a 400 naming why tools cannot be served."""
    family = detect_family(chat_template)
    if family is None:
        raise bad_request(
            "tools: this model's chat template teaches no tool-call format fitllm can read "
            f'({", ".join(FAMILIES)}); send tool_choice "none" or no tools',
            "tools",
        )
    return family


def chat_tools(
    extra: dict[str, Any], chat_template: str | None, messages: list[dict[str, Any]]
) -> tuple[ToolRequest | None, str | None, StructuredOutput | None, list[dict[str, Any]]]:
    """A chat request's tools (checked), the family whose calls its replies are parsed in (None: none
    parsed), the constraint a forced call puts on the output (tool_choice "required" or a named function;
    None otherwise), and its messages in the shape the template reads tools and calls."""
    tools = read_tools(extra)
    family = forced = None
    if tools is not None and tools.parses_calls:
        family = tool_family(chat_template)
        if tools.choice in ("required", "function"):
            forced = forced_call_output(tools, family)
    return tools, family, forced, fit_to_template(chat_template, messages, tools.tools if tools else None)


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI message as chat templates read it: tool calls' arguments as objects (templates write them
    with `tojson`; OpenAI sends them as JSON strings), tool results with their call id and name."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request("an assistant tool call needs function.name", "messages")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except ValueError as exc:
                    raise bad_request("tool call arguments must be a JSON object string", "messages") from exc
            calls.append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": args},
                }
            )
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    return out


# GLM-4-9B-chat's template (and CodeGeeX4's, trained on it) reads the tools from a message (`item['tools']`),
# not from a `tools` variable, and writes a call as the assistant's `metadata` (the function's name) and
# content (the arguments), a result as an `observation` turn: the shape GLM-4's own chat() builds.


def fit_to_template(
    template: str | None, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """`messages` as the template reads tools and calls: unchanged for templates that take `tools=` (as
    transformers passes them); for GLM-4's message-level form, the tools on the first system message (one is
    added when there is none), each call an assistant turn with the name as `metadata` and the arguments as
    content, each result an `observation` turn."""
    if not template or not MESSAGE_TOOLS.search(template):
        return messages
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                out.append({"role": "assistant", "metadata": "", "content": m["content"]})
            for call in m["tool_calls"]:
                args = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                out.append({"role": "assistant", "metadata": call["function"]["name"], "content": args})
        elif m["role"] == "tool":
            out.append({"role": "observation", "metadata": "", "content": m.get("content") or ""})
        else:
            out.append({"metadata": "", **m})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "tools": tools}
        else:
            out.insert(0, {"role": "system", "metadata": "", "content": "", "tools": tools})
    return out


# ---- what a constrained decoder must enforce for "required" and a named function --------------------


@dataclass(frozen=True, slots=True)
class CallConstraint:
    """The output a forced tool call must have: `prefix`, then JSON valid against `schema`, then `suffix`.
    The structured-output engine compiles the schema (xgrammar / llguidance) and emits the fixed texts."""

    prefix: str
    schema: dict[str, Any]
    suffix: str


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call `{"name": ..., "arguments": {...}}` of any of `tools` (or only of `name`):
    one alternative per function, its name a constant and its arguments its own parameters' schema."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not options:
        raise ValueError(f"no tool named {name!r}")
    return options[0] if len(options) == 1 else {"anyOf": options}


def forced_call_constraint(req: ToolRequest, family: str) -> CallConstraint:
    """What tool_choice "required" or a named function must force, in the family's own wrapper:
    hermes `<tool_call>\\n{"name":..,"arguments":..}\\n</tool_call>`; llama3_json the bare object with
    "parameters" for the arguments; glm4 the name line, then the arguments object alone."""
    name = req.forced_name
    if family == "hermes":
        return CallConstraint("<tool_call>\n", call_schema(req.tools, name), "\n</tool_call>")
    if family == "llama3_json":
        schema = call_schema(req.tools, name)
        for option in schema.get("anyOf", [schema]):
            option["properties"]["parameters"] = option["properties"].pop("arguments")
            option["required"] = ["name", "parameters"]
        return CallConstraint("", schema, "")
    if family == "glm4":
        if name is None:
            # The name precedes the JSON, so "required" over several tools is a choice of prefixes: the
            # decoder takes one CallConstraint per tool as alternatives (one when a single tool is offered).
            if len(req.tools) != 1:
                raise ValueError(
                    "glm4: 'required' over several tools is one constraint per tool (forced_call_constraints)"
                )
            name = req.tools[0]["function"]["name"]
        fn = next(t["function"] for t in req.tools if t["function"]["name"] == name)
        return CallConstraint(f"{name}\n", fn.get("parameters") or {"type": "object"}, "")
    raise ValueError(f"unknown tool-call family {family!r}")


def forced_call_constraints(req: ToolRequest, family: str) -> list[CallConstraint]:
    """What tool_choice "required" / a named function must force, as alternatives the output must match one
    of: one CallConstraint, except GLM-4's "required" over several tools (one per tool, its name line first).
    Each maps onto xgrammar's structural tag (begin=prefix, schema, end=suffix) or a llguidance grammar of
    the literal prefix, a %json schema and the literal suffix."""
    if family == "glm4" and req.forced_name is None and len(req.tools) > 1:
        return [
            forced_call_constraint(ToolRequest(req.tools, "function", t["function"]["name"]), "glm4")
            for t in req.tools
        ]
    return [forced_call_constraint(req, family)]


def forced_call_output(req: ToolRequest, family: str) -> StructuredOutput:
    """tool_choice "required" / a named function as the engine's constraint: a Lark grammar (llguidance)
    whose alternatives are forced_call_constraints', each the literal prefix, the call's JSON (written as
    the other JSON constraints are: spec.JSON_OPTIONS) and the literal suffix. The grammar's end stops the
    request, so a forced reply is exactly one call, as OpenAI's is."""
    rules = []
    for c in forced_call_constraints(req, family):
        schema = dict(c.schema, **{"x-guidance": JSON_OPTIONS})
        parts = [json.dumps(c.prefix)] if c.prefix else []
        parts.append("%json " + json.dumps(schema))
        if c.suffix:
            parts.append(json.dumps(c.suffix))
        rules.append(" ".join(parts))
    return StructuredOutput("grammar", "start: " + " | ".join(rules), field="tool_choice")
