"""Structured output (fitllm/engine/structured/): every constrained output matches its constraint, checked
by references nobody here wrote (`jsonschema` for schemas, `json` for llama.cpp's own json.gbnf, Python's `re`
for regexes, the `openai` client's pydantic `parse` helper), on the real default model and on random weights
(which write nothing sensible unless the grammar forces it); alone, mixed with unconstrained requests (whose
output must not change), preempted, rewound by a banned string, and with async scheduling."""

from __future__ import annotations

import json
import re
import string

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.engine.structured.spec import StructuredOutput
from fitllm.loader import open_model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
# llama.cpp's grammars/json.gbnf (its empty alternative is what xgrammar's parser refuses)
JSON_GBNF = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
LIST_GBNF = r"""root ::= "Colours:\n" item item item
item ::= "- " ("red" | "green" | "blue" | "yellow") "\n"
"""


def run(engine: Engine, prompts, params) -> list:
    """Add every request, step to the end (pool integrity after each step); outputs in order."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out
        engine.check_integrity()
    assert engine.pool.num_used_blocks == 0
    return [done[r].outputs[0] for r in rids]


def chat(engine: Engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def json_params(schema, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 512)
    return SamplingParams(structured_output=StructuredOutput.json_schema(schema), **kw)


def check_json(out, schema) -> None:
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    jsonschema.validate(json.loads(out.text), schema)


# ---- schemas hypothesis draws: every string, integer, array and object bounded, so that the grammar
# itself ends every document within max_tokens, whatever the weights write
NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)
LEAVES = st.one_of(
    st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.one_of(NAMES, st.integers(-9, 9)), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}
    ),
    st.from_regex(r"[a-z]{1,3}", fullmatch=True).map(lambda r: {"type": "string", "pattern": f"^{r}[0-9]?$"}),
)


def _object(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": req,
                "additionalProperties": False,
            }
        )
    )


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        _object(children),
        children.map(lambda c: {"type": "array", "items": c, "maxItems": 3}),
        st.lists(children, min_size=2, max_size=2).map(lambda cs: {"anyOf": cs}),
    ),
    max_leaves=6,
).filter(lambda s: len(json.dumps(s)) < 600)


def slow(n: int):
    """Few examples (each is a generation), no deadline, the same examples every run."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    # The dequantized default model (auto's int4 in float32 dequantizes every call: 5x slower here).
    return Engine(
        EngineConfig(dtype="float32", quantization="none", max_model_len=1024, max_num_seqs=16, seed=0)
    )


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory) -> Engine:
    """Random weights (a tiny llama) with the default model's tokenizer: JSON only where a grammar makes it."""
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(
        tmp_path_factory.mktemp("rnd"), vocab_size=49152, max_position_embeddings=1024
    )
    open_model(None).tokenizer().backend.save(str(folder / "tokenizer.json"))
    return Engine(EngineConfig(model=str(folder), dtype="float32", max_model_len=1024, max_num_seqs=16))


@slow(5)
@given(schema=SCHEMAS)
def test_schema_alone_validates(engine, schema):
    prompt = chat(engine, f"Answer with JSON matching this schema: {json.dumps(schema)}")
    (out,) = run(engine, [prompt], [json_params(schema)])
    check_json(out, schema)


@slow(3)
@given(schemas=st.lists(SCHEMAS, min_size=3, max_size=3))
def test_schemas_mixed_with_free_requests_validate_and_leave_the_free_ones_alone(engine, schemas):
    free = [chat(engine, "Write a haiku about rain."), "The capital of France is"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = run(engine, free, [greedy, greedy])
    prompts = [chat(engine, f"Answer with JSON for: {json.dumps(s)}") for s in schemas]
    outs = run(engine, [free[0], *prompts, free[1]], [greedy] + [json_params(s) for s in schemas] + [greedy])
    for out, schema in zip(outs[1:-1], schemas, strict=True):
        check_json(out, schema)
    assert [outs[0].token_ids, outs[-1].token_ids] == [alone[0].token_ids, alone[1].token_ids]


@slow(4)
@given(schemas=st.lists(SCHEMAS, min_size=4, max_size=4), seed=st.integers(0, 1000))
def test_random_weights_sampled_still_write_valid_json(random_engine, schemas, seed):
    params = [json_params(s, temperature=1.0, seed=seed + i, max_tokens=900) for i, s in enumerate(schemas)]
    outs = run(random_engine, [[5, 6, 7, 8]] * 4, params)
    for out, schema in zip(outs, schemas, strict=True):
        check_json(out, schema)


def test_json_object_regex_choice_and_gbnf(engine):
    small = chat(engine, 'Reply with a small JSON object: {"name": ..., "colour": ...} for a cat.')
    pick = chat(engine, "Name an animal and a number.")
    specs = [
        (small, StructuredOutput("json_object")),
        (pick, StructuredOutput("regex", r"[A-Z][a-z]{2,8} [0-9]{2}")),
        (pick, StructuredOutput.choice(["cat", "dog", "parrot"])),
        (small, StructuredOutput("grammar", JSON_GBNF)),
        (chat(engine, "List three colours."), StructuredOutput("grammar", LIST_GBNF)),
    ]
    outs = run(
        engine,
        [p for p, _ in specs],
        [SamplingParams(temperature=0, max_tokens=300, structured_output=s) for _, s in specs],
    )
    assert all(o.finish_reason == "stop" for o in outs), [(o.finish_reason, o.text) for o in outs]
    assert isinstance(json.loads(outs[0].text), dict)
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", outs[1].text)
    assert outs[2].text in ("cat", "dog", "parrot")
    assert isinstance(json.loads(outs[3].text), dict)
    assert re.fullmatch(r"Colours:\n(- (red|green|blue|yellow)\n){3}", outs[4].text)


def test_random_weights_follow_a_gbnf_grammar(random_engine):
    params = [
        SamplingParams(
            temperature=1.0, seed=i, max_tokens=200, structured_output=StructuredOutput("grammar", LIST_GBNF)
        )
        for i in range(3)
    ]
    for out in run(random_engine, [[9, 10, 11]] * 3, params):
        assert re.fullmatch(r"Colours:\n(- (red|green|blue|yellow)\n){3}", out.text), out.text


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_constrained_requests_write_what_they_write_alone(tmp_path_factory, random_engine, mode):
    """A pool of a few blocks: the batch preempts (recomputing, or swapping to host), the matchers carry
    over (output tokens are kept), and every output equals its run alone, valid."""
    folder = random_engine.config.model
    block = random_engine.storage.block_bytes
    tight = Engine(EngineConfig(model=folder, dtype="float32", max_model_len=1024, max_num_seqs=8, block_size=16,
                                kv_cache_memory=30 * block, preemption_mode=mode, swap_space=64 * block if mode == "swap" else None))  # fmt: skip
    schema = {"type": "array", "items": PERSON, "minItems": 2, "maxItems": 3}
    params = [json_params(schema, temperature=1.0, seed=i, max_tokens=330) for i in range(6)]
    prompts = [list(range(1000 + 7 * i, 1100 + 7 * i)) for i in range(6)]  # whole characters
    alone = [run(tight, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    before = tight.scheduler.num_preemptions
    outs = run(tight, prompts, params)
    assert tight.scheduler.num_preemptions > before, "the pool was meant to be too small for all six"
    for out, ref in zip(outs, alone, strict=True):
        assert out.token_ids == ref.token_ids
        check_json(out, schema)


def test_banned_string_rewind_rolls_the_matcher_back(engine):
    prompt = chat(engine, "Describe a person as JSON with name and age.")
    (free,) = run(engine, [prompt], [json_params(PERSON)])
    name = json.loads(free.text)["name"].split()[0]
    assert len(name) > 2
    ids = [engine.add_request(prompt, json_params(PERSON, banned_strings=[name]))]
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done = out
        req = engine.requests.get(ids[0])
        if req is not None:
            assert req.constraint.num_accepted == req.num_output_tokens
            rewinds = req.banned.num_rewinds
    assert rewinds > 0
    check_json(done.outputs[0], PERSON)
    assert name.lower() not in done.outputs[0].text.lower()


def test_async_scheduling_gives_the_same_constrained_output(random_engine):
    folder = random_engine.config.model
    on = Engine(
        EngineConfig(model=folder, dtype="float32", max_model_len=1024, max_num_seqs=8, async_scheduling="on")
    )
    schema = {"type": "array", "items": PERSON, "maxItems": 2}
    params = [json_params(schema, temperature=1.0, seed=i, max_tokens=300) for i in range(3)]
    params.append(SamplingParams(temperature=1.0, seed=9, max_tokens=30))
    prompts = [[3, 4, 5 + i] for i in range(4)]
    assert [o.token_ids for o in run(on, prompts, params)] == [
        o.token_ids for o in run(random_engine, prompts, params)
    ]


def test_grammar_completes_even_with_ignore_eos_and_compiles_once(engine):
    before = engine.grammars.num_compiled
    spec = StructuredOutput.choice(["yes", "no"])
    params = [SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_output=spec)] * 3
    outs = run(engine, [chat(engine, "Is water wet?")] * 3, params)
    assert all(o.text in ("yes", "no") and o.finish_reason == "stop" for o in outs)
    assert engine.grammars.num_compiled - before <= 1


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (StructuredOutput.json_schema({"type": "foo"}, "guided_json"), ["guided_json", "foo"]),
        (StructuredOutput("regex", "((", "guided_regex"), ["guided_regex"]),
        (StructuredOutput("grammar", 'root ::= ("a"', "grammar"), ["grammar"]),
    ],
)
def test_a_bad_constraint_is_refused_at_admission_naming_its_field(engine, spec, words):
    with pytest.raises(ValueError) as err:
        engine.add_request("hi", SamplingParams(structured_output=spec))
    assert str(err.value).startswith(words[0]) and all(w in str(err.value) for w in words)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "samplers",
    [
        dict(top_k=5, top_p=0.5, min_p=0.1),
        dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
        dict(mirostat=2),
        dict(xtc_probability=0.9, xtc_threshold=0.05),
        dict(typical_p=0.5, top_a=0.2, tfs=0.9),
        dict(dry_multiplier=0.8, top_n_sigma=1.0, temperature_last=True, top_k=10),
        dict(sampler_order=["temperature", "top_k"], top_k=3, smoothing_factor=0.3),
        dict(logit_bias={31845: 100.0}, min_tokens=5),  # bias toward "}]"; min_tokens bans EOS early
    ],
    ids=["cuts", "penalties", "mirostat", "xtc", "typical_top_a_tfs", "dry_sigma", "order_smoothing", "bias"],
)
def test_every_sampler_keeps_to_the_grammar(random_engine, samplers):
    """Each sampler path (the fast cuts, the penalties, KoboldCpp's chain) runs on the masked logits."""
    schema = {"type": "array", "items": PERSON, "maxItems": 2}
    params = [json_params(schema, temperature=1.0, seed=s, max_tokens=400, **samplers) for s in range(3)]
    for out in run(random_engine, [[40, 41, 42]] * 3, params):
        check_json(out, schema)
