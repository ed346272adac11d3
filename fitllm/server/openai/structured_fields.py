"""The structured-output fields of the OpenAI-compatible routes, each read into one StructuredOutput
(fitllm/engine/structured/spec.py), named by the field the client sent so errors point at it:

- OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}; the schema is enforced whether `strict` is true or not (as vLLM does). llama.cpp's
  server also reads {"type": "json_object", "schema": {...}} and {"type": "json_schema", "schema": {...}}.
- vLLM: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and `structured_outputs` {"json",
  "regex", "choice", "grammar", "json_object"}.
- llama.cpp's server: `json_schema` and `grammar` (GBNF); text-generation-webui's `grammar_string`.

Grammars are GBNF (llama.cpp's) or Lark, as llguidance reads them. At most one constraint per request.
"""

from __future__ import annotations

from typing import Any

from fitllm.engine.structured.spec import StructuredOutput
from fitllm.server.errors import bad_request

# vLLM's structured_outputs keys -> the kind they set.
_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _spec(kind: str, value: Any, field: str) -> StructuredOutput:
    try:
        if kind == "json_schema":
            return StructuredOutput.json_schema(value, field)
        if kind == "choice":
            return StructuredOutput.choice(value, field)
        if kind == "json_object":
            return StructuredOutput("json_object", None, field)
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a string")
        return StructuredOutput(kind, value, field)  # type: ignore[arg-type]
    except ValueError as exc:
        raise bad_request(str(exc), field) from None


def _response_format(v: Any) -> StructuredOutput | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad_request('response_format must be an object with a "type"', "response_format")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        if v.get("schema") is not None:  # llama.cpp's extension
            return _spec("json_schema", v["schema"], "response_format")
        return _spec("json_object", None, "response_format")
    if kind == "json_schema":
        inner = v.get("json_schema")
        if isinstance(inner, dict) and inner.get("schema") is not None:
            return _spec("json_schema", inner["schema"], "response_format")
        if v.get("schema") is not None:  # llama.cpp's flat form
            return _spec("json_schema", v["schema"], "response_format")
        raise bad_request("response_format: json_schema needs json_schema.schema", "response_format")
    raise bad_request(
        f'response_format: type must be "text", "json_object" or "json_schema"; got {kind!r}',
        "response_format",
    )


def _structured_outputs(v: Any) -> StructuredOutput | None:
    if not isinstance(v, dict):
        raise bad_request("structured_outputs must be an object", "structured_outputs")
    found = []
    for key, value in v.items():
        if value is None or value is False:
            continue
        if key in _VLLM_KEYS:
            found.append(_spec(_VLLM_KEYS[key], value, "structured_outputs"))
        elif key == "json_object":
            found.append(_spec("json_object", None, "structured_outputs"))
        elif key in (
            "disable_fallback",
            "disable_any_whitespace",
            "disable_additional_properties",
            "whitespace_pattern",
        ):
            if key == "whitespace_pattern":
                raise bad_request(
                    "structured_outputs: whitespace_pattern is not supported", "structured_outputs"
                )
        else:
            raise bad_request(f"structured_outputs: {key} is not supported", "structured_outputs")
    if len(found) > 1:
        raise bad_request(
            "structured_outputs: give one of json, regex, choice, grammar, json_object", "structured_outputs"
        )
    return found[0] if found else None


def structured_output(extra: dict[str, Any]) -> StructuredOutput | None:
    """The request's constraint from its body's extra fields (None: free text); a 400 for a malformed one or
    for two at once."""
    found: list[StructuredOutput] = []

    def take(spec: StructuredOutput | None) -> None:
        if spec is not None:
            found.append(spec)

    if extra.get("response_format") is not None:
        take(_response_format(extra["response_format"]))
    if extra.get("structured_outputs") is not None:
        take(_structured_outputs(extra["structured_outputs"]))
    for name, kind in (
        ("guided_json", "json_schema"),
        ("json_schema", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
        ("grammar", "grammar"),
        ("grammar_string", "grammar"),
    ):
        value = extra.get(name)
        if value is None or value == "" or value == {}:
            continue
        take(_spec(kind, value, name))
    if len(found) > 1:
        raise bad_request(
            f"{found[0].field} and {found[1].field} each constrain the output; send one", found[1].field
        )
    return found[0] if found else None
