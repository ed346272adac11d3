"""Tool calls on /v1/chat/completions: parsing per family (fixed outputs), the streamed split, templates
rendered with tools as transformers renders them, the schema a forced call must satisfy, and the official
openai client's whole tool-calling flow against a server whose engine emits scripted text (a random-weight
model never writes a call on its own; tests/stand_ins.py scripted_engine)."""

from __future__ import annotations

import json

import openai
import pytest
from code_models import (
    GLM_TEMPLATE,
    LLAMA31_TEMPLATE,
    LLAMA_SPECIAL,
    QWEN_TEMPLATE,
    codegeex_checkpoint,
    llama31_checkpoint,
    qwen_coder_checkpoint,
)
from live_server import serve
from stand_ins import AddTap, Script, scripted_engine

from benchmarks.random_weights import write_byte_tokenizer
from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.loader.chat_template import render_chat_template
from fitllm.server.errors import APIError
from fitllm.server.openai.tool_parsers import ToolCallStream, detect_family, parse_tool_calls
from fitllm.server.openai.tools import (
    ToolRequest,
    call_schema,
    fit_to_template,
    forced_call_constraint,
    forced_call_constraints,
    read_tools,
    template_message,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
NAMES = {"get_weather", "get_time"}

# (family, model output, expected content, expected calls as (name, arguments object))
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me look.",
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ("hermes", "It is sunny.", "It is sunny.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [("get_weather", {"city": "Rome"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", '
     '"arguments": {"city": "Lima"}}', None, [("get_time", {}), ("get_weather", {"city": "Lima"})]),
    ("llama3_json", "Sure: {json}", "Sure: {json}", []),
    ("glm4", 'get_weather\n{"city": "Beijing"}', None, [("get_weather", {"city": "Beijing"})]),
    ("glm4", '```json\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\n```', None,
     [("get_weather", {"city": "Beijing"})]),
    ("glm4", "get_weather is a function I know.", "get_weather is a function I know.", []),
]  # fmt: skip


@pytest.mark.parametrize("family,text,content,calls", CASES)
def test_parse_each_family(family, text, content, calls):
    parsed = parse_tool_calls(text, family, NAMES)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert len({c.id for c in parsed.calls}) == len(calls)


@pytest.mark.parametrize("family,text,content,calls", CASES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_split_matches_the_whole(family, text, content, calls, step):
    """Fed in pieces of any size, the stream lets out the same text and calls as parsing the whole reply;
    text is never sent that later turns out to be part of a call."""
    split = ToolCallStream(family, NAMES)
    sent, got = "", []
    for i in range(0, len(text), step):
        out, new = split.feed(text[i : i + step])
        sent, got = sent + out, got + new
    out, new = split.finish()
    sent, got = sent + out, got + new
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert sent.strip() == (content or "")


def test_detect_family():
    assert detect_family(QWEN_TEMPLATE) == "hermes"
    assert detect_family(LLAMA31_TEMPLATE) == "llama3_json"
    assert detect_family(GLM_TEMPLATE) == "glm4"
    assert detect_family("{{ messages[0].content }}") is None


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "<clear>"}'},
]


def _openai_shape_with_object_arguments() -> list[dict]:
    """The conversation as transformers' docs pass it: tool-call arguments as objects."""
    out = []
    for m in CONVERSATION:
        if m.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = m | {"tool_calls": calls}
        out.append(m)
    return out


def _glm4_shape() -> list[dict]:
    """The conversation as GLM-4's own chat() builds it: the tools on the system message, the call as the
    assistant's metadata (name) and content (arguments), the result as an observation turn."""
    return [
        {"role": "system", "content": "Be brief.", "tools": [WEATHER, TIME]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temp": 21, "sky": "<clear>"}'},
    ]


@pytest.mark.parametrize(
    "template,reference",
    [
        (QWEN_TEMPLATE, _openai_shape_with_object_arguments),
        (LLAMA31_TEMPLATE, _openai_shape_with_object_arguments),
        (GLM_TEMPLATE, _glm4_shape),
    ],
    ids=["qwen", "llama31", "glm4"],
)
def test_template_with_tools_renders_as_transformers(template, reference):
    """The tools and a tool-call round trip in OpenAI's shape go through the template as transformers renders
    the family's own shape of them (its `tojson`, arguments as objects; GLM-4's message-level tools), so the
    model sees what it was trained on."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    hf.chat_template = template
    want = hf.apply_chat_template(
        reference(), tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True
    )
    messages = [template_message(m | {"content": m["content"] or ""}) for m in CONVERSATION]
    got = render_chat_template(
        template,
        messages=fit_to_template(template, messages, [WEATHER, TIME]),
        tools=[WEATHER, TIME],
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )
    assert got == want
    assert '"city": "Paris"' in got and "<clear>" in got and "get_time" in got and "Be brief." in got


def test_read_tools_checks():
    assert read_tools({}) is None
    assert read_tools({"tools": [WEATHER]}).choice == "auto"
    assert (
        read_tools(
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        ).forced_name
        == "get_weather"
    )
    for bad in (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [WEATHER, WEATHER]},
        {"tools": [{"type": "function", "function": {}}]},
        {"tools": "get_weather"},
        {"tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": "always"},
    ):
        with pytest.raises(APIError):
            read_tools(bad)


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "glm4"])
@pytest.mark.parametrize("forced", [None, "get_weather"])
def test_forced_call_constraint_round_trips(family, forced):
    """What "required" / a named function must force: the family's wrapper around JSON of the call schema,
    and text of that shape is what the family's parser reads back as the call."""
    tools = [WEATHER] if family == "glm4" and forced is None else [WEATHER, TIME]
    req = ToolRequest(tools, "function" if forced else "required", forced)
    c = forced_call_constraint(req, family)
    args = {"city": "Paris"}
    if family == "glm4":
        assert c.prefix == "get_weather\n" and c.schema == WEATHER["function"]["parameters"]
        instance = args
    else:
        key = "parameters" if family == "llama3_json" else "arguments"
        options = c.schema.get("anyOf", [c.schema])
        assert [o["properties"]["name"] for o in options] == (
            [{"const": "get_weather"}] if forced else [{"const": "get_weather"}, {"const": "get_time"}]
        )
        assert options[0]["properties"][key] == WEATHER["function"]["parameters"]
        assert set(options[0]["required"]) == {"name", key} and options[0]["additionalProperties"] is False
        instance = {"name": "get_weather", key: args}
    parsed = parse_tool_calls(c.prefix + json.dumps(instance) + c.suffix, family, NAMES)
    assert [(t.name, json.loads(t.arguments)) for t in parsed.calls] == [("get_weather", args)]


def test_glm4_required_over_several_tools_is_one_constraint_each():
    alts = forced_call_constraints(ToolRequest([WEATHER, TIME], "required"), "glm4")
    assert [a.prefix for a in alts] == ["get_weather\n", "get_time\n"]
    with pytest.raises(ValueError):
        forced_call_constraint(ToolRequest([WEATHER, TIME], "required"), "glm4")
    assert call_schema([WEATHER, TIME], "get_time")["properties"]["name"] == {"const": "get_time"}
    hermes = forced_call_constraints(ToolRequest([WEATHER, TIME], "required"), "hermes")
    assert len(hermes) == 1 and len(hermes[0].schema["anyOf"]) == 2


# ---- the openai client, end to end --------------------------------------------------------------------


CHECKPOINTS = {"qwen2": qwen_coder_checkpoint, "glm": codegeex_checkpoint, "llama": llama31_checkpoint}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def tool_server(request, tmp_path_factory):
    folder = CHECKPOINTS[request.param](tmp_path_factory.mktemp(f"tools-{request.param}"))
    script = Script()
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=1024)
    engine = AsyncEngine(config, engine_factory=lambda c: scripted_engine(c, script))
    with serve(engine, request.param) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120)
        yield s, client, script, request.param


def _say(server, script, text):
    script.ids = server.engine.served_model.tokenizer.encode(text, add_special_tokens=False)


CALL_TEXT = {
    "qwen2": 'One moment.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "glm": 'get_weather\n{"city": "Paris"}',
    "llama": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
}
CALL_CONTENT = {"qwen2": "One moment.", "glm": None, "llama": None}


def test_openai_client_tool_flow(tool_server):
    """The openai client's tool flow: the call comes back as tool_calls (finish_reason tool_calls), then the
    assistant's call and the tool's result go back in through the template and the model answers."""
    server, client, script, family = tool_server
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    _say(server, script, CALL_TEXT[family])
    with AddTap(server.engine) as tap:
        r = client.chat.completions.create(model=server.name, messages=messages, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == CALL_CONTENT[family]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
    prompt = server.engine.served_model.tokenizer.decode(tap.added[0][0], skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and '"description": "The weather in a city"' in prompt

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 C and clear"},
    ]
    _say(server, script, "It is 21 C in Paris.")
    with AddTap(server.engine) as tap:
        r = client.chat.completions.create(model=server.name, messages=messages, tools=[WEATHER, TIME])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It is 21 C in Paris."
    assert not r.choices[0].message.tool_calls
    prompt = server.engine.served_model.tokenizer.decode(tap.added[0][0], skip_special_tokens=False)
    assert "21 C and clear" in prompt and '{"city": "Paris"}' in prompt


def test_openai_client_streamed_tool_calls(tool_server):
    """Streamed: text deltas, then the call as a tool_calls delta the client's stream helper assembles."""
    server, client, script, family = tool_server
    _say(server, script, CALL_TEXT[family])
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with client.chat.completions.stream(model=server.name, messages=messages, tools=[WEATHER]) as stream:
        chunks = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert (choice.message.content or None) == CALL_CONTENT[family]
    assert not any(
        "tool_call" in (getattr(c, "delta", "") or "") for c in chunks if c.type == "content.delta"
    )


def test_tool_choice_none(tool_server):
    """ "none": the reply is text even when it looks like a call."""
    server, client, script, family = tool_server
    _say(server, script, CALL_TEXT[family])
    messages = [{"role": "user", "content": "Weather?"}]
    r = client.chat.completions.create(
        model=server.name, messages=messages, tools=[WEATHER], tool_choice="none"
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "get_weather" in r.choices[0].message.content


# Arguments a random model can finish: every value an enum, no other properties.
FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "The forecast",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["C", "F"]}, "days": {"enum": [1, 2, 3]}},
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
ALERTS = {
    "type": "function",
    "function": {
        "name": "alerts",
        "parameters": {
            "type": "object",
            "properties": {"level": {"enum": ["low", "high"]}},
            "required": ["level"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def random_tool_server(request, tmp_path_factory):
    """A real engine on random weights: it writes a call only because the grammar makes it."""
    folder = CHECKPOINTS[request.param](tmp_path_factory.mktemp(f"forced-{request.param}"))
    engine = AsyncEngine(EngineConfig(model=str(folder), dtype="float32", max_model_len=2048))
    with serve(engine, request.param) as s:
        yield s, openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("choice", ["required", "forecast", "alerts"])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_choice_makes_one_valid_call(random_tool_server, choice, stream):
    """tool_choice "required" or a named function: random weights, constrained by the family's call grammar,
    answer with exactly one call to an offered (or the named) tool whose arguments follow its schema; the
    official client reads it as tool_calls, plain and streamed."""
    server, client = random_tool_server
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": choice}}
    kw = dict(
        model=server.name,
        messages=[{"role": "user", "content": "Forecast?"}],
        tools=[FORECAST, ALERTS],
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=200,
    )
    if stream:
        with client.chat.completions.stream(**kw) as s:
            list(s)
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(**kw)
    out = final.choices[0]
    assert out.finish_reason == "tool_calls", out
    (call,) = out.message.tool_calls
    assert call.function.name in ({"forecast", "alerts"} if choice == "required" else {choice})
    args = json.loads(call.function.arguments)
    spec = (FORECAST if call.function.name == "forecast" else ALERTS)["function"]["parameters"]
    assert set(args) == set(spec["required"])
    assert all(args[k] in spec["properties"][k]["enum"] for k in args)


def test_forced_tool_choice_with_another_constraint_is_a_400(random_tool_server):
    server, client = random_tool_server
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=server.name,
            messages=[{"role": "user", "content": "Forecast?"}],
            tools=[FORECAST],
            tool_choice="required",
            response_format={"type": "json_object"},
        )


def test_chat_prompts_start_with_the_templates_own_bos(tmp_path):
    """Llama 3's tokenizer adds <|begin_of_text|> and its template writes it too: a chat prompt has it once
    (as transformers' apply_chat_template(tokenize=True) and vLLM tokenize it), twice only when the body
    asks for add_special_tokens."""
    folder = llama31_checkpoint(tmp_path)
    write_byte_tokenizer(
        folder, LLAMA_SPECIAL, (), LLAMA31_TEMPLATE, eos="<|eot_id|>", prefix_tokens=["<|begin_of_text|>"]
    )
    bos = 256 + LLAMA_SPECIAL.index("<|begin_of_text|>")
    engine = AsyncEngine(EngineConfig(model=str(folder), dtype="float32", max_model_len=512))
    with serve(engine, "llama") as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=120)
        counts = []
        for extra in ({}, {"add_special_tokens": True}):
            with AddTap(s.engine) as tap:
                client.chat.completions.create(
                    model="llama",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=1,
                    extra_body=extra,
                )
            ids = tap.added[0][0]
            counts.append((ids[0] == bos, ids.count(bos)))
    assert counts == [(True, 1), (True, 2)]


def test_tools_on_a_model_without_a_tool_format(tmp_path, make_random_checkpoint):
    folder = make_random_checkpoint(tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    engine = AsyncEngine(EngineConfig(model=str(folder), dtype="float32", max_model_len=128))
    with serve(engine, "plain") as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no tool-call format"):
            client.chat.completions.create(
                model="plain", messages=[{"role": "user", "content": "t1"}], tools=[WEATHER]
            )
