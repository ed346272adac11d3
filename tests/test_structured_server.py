"""Structured output through HTTP on the default model: the official `openai` client's pydantic `parse`
helper, OpenAI's response_format (also streamed), vLLM's guided_* / structured_outputs, llama.cpp's
json_schema / grammar, KoboldCpp's grammar, and the 400s naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_openai_client_parse_helper_fills_the_pydantic_model(server, client):
    resp = client.chat.completions.parse(
        model=server.name, messages=ASK, response_format=Person, temperature=0, max_tokens=100
    )
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person) and msg.parsed == Person.model_validate_json(msg.content)


def test_response_format_json_schema_streamed(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    stream = client.chat.completions.create(
        model=server.name,
        messages=ASK,
        response_format=fmt,
        temperature=0.8,
        seed=3,
        max_tokens=100,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_response_format_json_object(server, client):
    resp = client.chat.completions.create(
        model=server.name,
        messages=ASK,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_choice": ["Paris", "London"]}, lambda t: t in ("Paris", "London")),
        ({"guided_regex": r"[0-9]{4}-[0-9]{2}"}, lambda t: re.fullmatch(r"[0-9]{4}-[0-9]{2}", t)),
        ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"json_schema": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),  # llama.cpp
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_grammar": 'root ::= "A" [0-9] [0-9]'}, lambda t: re.fullmatch(r"A[0-9]{2}", t)),
        ({"grammar": 'root ::= "B" [a-z]+ "."'}, lambda t: re.fullmatch(r"B[a-z]+\.", t)),  # llama.cpp's GBNF
    ],
    ids=[
        "guided_choice",
        "guided_regex",
        "guided_json",
        "json_schema",
        "structured_outputs",
        "guided_grammar",
        "grammar",
    ],
)
def test_completion_constraint_fields(server, client, extra, check):
    resp = client.completions.create(
        model=server.name, prompt="The answer:", max_tokens=60, temperature=0, extra_body=extra
    )
    text = resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop" and check(text), text


def test_kobold_grammar(server, http):
    body = {
        "prompt": "My favourite colour is",
        "max_length": 20,
        "grammar": 'root ::= " " ("red" | "blue") "."',
    }
    r = http.post("/api/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["text"] in (" red.", " blue.")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format",
        ),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ],
    ids=[
        "bad_schema",
        "bad_regex",
        "choice_not_a_list",
        "two_constraints",
        "unknown_type",
        "whitespace_pattern",
    ],
)
def test_bad_constraints_are_400s_naming_the_field(server, client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=server.name, messages=ASK, max_tokens=5, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body
