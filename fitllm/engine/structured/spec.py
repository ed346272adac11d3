"""What a request's output must match: one frozen, hashable spec (the compiled-grammar cache's key), and its
llguidance grammar text. Front ends build a spec from their own fields (OpenAI's response_format, vLLM's
guided_* / structured_outputs, llama.cpp's json_schema / grammar, KoboldCpp's grammar) and name that field
in `field`, so a schema or grammar that does not compile is a 400 naming what the client sent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")

# JSON as models write it (", " and ": "), with no other whitespace: flexible whitespace lets a weak model
# loop on spaces and newlines until max_tokens cuts the document short.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's json_object: any JSON object


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the whole output. `value`: json_schema: the schema as compact JSON text (key order kept: properties are written in it); regex and
    grammar (GBNF or Lark, as llguidance reads them): the text; choice: the strings; json_object: None.
    `field`: the request field it came from (for errors); not part of equality or the hash."""

    kind: Kind
    value: str | tuple[str, ...] | None = None
    field: str = field(default="structured_output", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"{self.field}: the constraint kind must be one of {list(KINDS)}; got {self.kind!r}"
            )
        if self.kind == "json_object":
            if self.value is not None:
                raise ValueError(f"{self.field}: json_object takes no value")
        elif self.kind == "choice":
            if (
                not isinstance(self.value, tuple)
                or not self.value
                or not all(isinstance(c, str) for c in self.value)
            ):
                raise ValueError(f"{self.field} must be a non-empty list of strings")
        elif not isinstance(self.value, str) or not self.value.strip():
            raise ValueError(f"{self.field} must be a non-empty string")

    @classmethod
    def json_schema(cls, schema: Any, field: str = "json_schema") -> StructuredOutput:
        """From a schema given as an object, a boolean, or JSON text (as some clients send it)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"{field} is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{field} must be a JSON schema (an object); got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), field)

    @classmethod
    def choice(cls, choices: Any, field: str = "choice") -> StructuredOutput:
        if not isinstance(choices, (list, tuple)):
            raise ValueError(f"{field} must be a non-empty list of strings")
        return cls("choice", tuple(choices), field)

    def grammar_text(self) -> str:
        """The llguidance grammar for this spec (not yet checked: compiling does that)."""
        import llguidance  # here, so that importing SamplingParams does not load the library

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            schema = json.loads(self.value)
            if schema is True:
                schema = {}
            elif schema is False:
                raise ValueError(f"{self.field}: the schema `false` matches nothing")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", list(self.value))
        try:  # GBNF (llama.cpp's) or Lark: llguidance tells them apart
            return llguidance.grammar_from("grammar", self.value)
        except ValueError as exc:
            raise ValueError(f"{self.field}: {exc}") from None
