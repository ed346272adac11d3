"""Fill-in-the-middle: prompts per family against each family's documented format (fitllm/loader/fim.py), FIM
tokens from GGUF metadata, and `/infill` and `suffix` through HTTP on random Qwen2-layout and GLM models whose
tokenizers carry the FIM tokens."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from code_models import GLM_SPECIAL, QWEN_SPECIAL, codegeex_checkpoint, qwen_coder_checkpoint
from conftest import hf_greedy, load_hf
from live_server import assert_error, serve
from stand_ins import AddTap

from benchmarks.random_weights import write_byte_tokenizer
from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.loader.fim import ExtraFile, build_fim_prompt, find_fim_tokens
from fitllm.loader.tokenizer import load_hf_tokenizer

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"


def _tokenizer(tmp_path, special, added=(), prefix_tokens=()):
    write_byte_tokenizer(tmp_path, special, list(added), prefix_tokens=list(prefix_tokens))
    return load_hf_tokenizer(tmp_path, [])


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_qwen_coder_repo_level_prompt(tmp_path):
    """Qwen2.5-Coder (repo and file-separator tokens): llama.cpp's /infill repo-level pattern, PSM."""
    tok = _tokenizer(tmp_path, QWEN_SPECIAL)
    fim = find_fim_tokens(tok)
    assert fim is not None and fim.family == "psm"
    ids = build_fim_prompt(tok, fim, PREFIX, SUFFIX, "c = ", [ExtraFile("X = 1\n", "a.py")])
    assert _text(tok, ids) == (
        "<|repo_name|>myproject\n<|file_sep|>a.py\nX = 1\n<|file_sep|>filename\n"
        f"<|fim_prefix|>{PREFIX}c = <|fim_suffix|>{SUFFIX}<|fim_middle|>"
    )
    # the FIM tokens are single ids, not spelled out
    assert ids[-1] == fim.mid == tok.token_id("<|fim_middle|>")
    assert ids.count(fim.pre) == ids.count(fim.suf) == 1
    # a middle ends at pad and the separators, as llama.cpp's end-of-generation set
    assert {tok.token_id(t) for t in ("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")} <= set(fim.stop_ids)


def test_special_token_text_in_the_code_is_spelled_out(tmp_path):
    """Code that contains a FIM token's text (this repository's fim.py does) is tokenized as plain text, as
    llama.cpp tokenizes /infill's inputs: the prompt keeps one <|fim_middle|> token, at its end."""
    tok = _tokenizer(tmp_path, QWEN_SPECIAL)
    fim = find_fim_tokens(tok)
    code = 'MID = "<|fim_middle|>"\n'
    ids = build_fim_prompt(tok, fim, code, SUFFIX)
    assert ids.count(fim.mid) == 1 and ids[-1] == fim.mid
    assert _text(tok, ids).endswith(f"<|fim_prefix|>{code}<|fim_suffix|>{SUFFIX}<|fim_middle|>")
    assert tok.encode(code, add_special_tokens=False).count(fim.mid) == 1  # (plain encode would parse it)


def test_starcoder_prompt_without_file_separator(tmp_path):
    """StarCoder's `<fim_…>` tokens and no file separator: other files after llama.cpp's snippet marker."""
    tok = _tokenizer(tmp_path, ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"])
    fim = find_fim_tokens(tok)
    ids = build_fim_prompt(tok, fim, PREFIX, SUFFIX, extra=[ExtraFile("X = 1")])
    assert _text(tok, ids) == (
        f"\n\n--- snippet ---\n\nX = 1<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    )


def test_codellama_prompt(tmp_path):
    """CodeLlama: BOS, ▁<PRE> prefix ▁<SUF> suffix ▁<MID> (Meta's infilling format), and <EOT> ends it."""
    special = ["<s>", "</s>", "▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
    tok = _tokenizer(tmp_path, special, prefix_tokens=["<s>"])
    fim = find_fim_tokens(tok)
    ids = build_fim_prompt(tok, fim, PREFIX, SUFFIX)
    assert ids[:2] == [tok.token_id("<s>"), tok.token_id("▁<PRE>")]
    assert _text(tok, ids) == f"<s>▁<PRE>{PREFIX}▁<SUF>{SUFFIX}▁<MID>"
    assert tok.token_id("▁<EOT>") in fim.stop_ids


def test_codegeex4_prompt_is_its_documented_format(tmp_path):
    """CodeGeeX4's infilling guide: a user turn, suffix first, then prefix, middle, and the assistant turn;
    cross-file references as ###REFERENCE blocks; GLM's [gMASK]<sop> first."""
    tok = _tokenizer(tmp_path, GLM_SPECIAL, prefix_tokens=["[gMASK]", "<sop>"])
    fim = find_fim_tokens(tok)
    assert fim.family == "codegeex"
    ids = build_fim_prompt(tok, fim, PREFIX, SUFFIX)
    assert _text(tok, ids) == (
        "[gMASK]<sop><|user|>\n###PATH:\n###LANGUAGE:\n###MODE:BLOCK\n"
        f"<|code_suffix|>{SUFFIX}<|code_prefix|>{PREFIX}<|code_middle|><|assistant|>\n"
    )
    ids = build_fim_prompt(tok, fim, PREFIX, SUFFIX, extra=[ExtraFile("def f(): pass", "./f.py")])
    assert _text(tok, ids).startswith(
        "[gMASK]<sop><|user|>\n###REFERENCE:\n###PATH:./f.py\ndef f(): pass\n###PATH:\n###LANGUAGE:"
    )


def test_no_fim_tokens(tmp_path):
    tok = _tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>"])
    assert find_fim_tokens(tok) is None


def test_fim_tokens_from_gguf_metadata(tmp_path):
    """GGUF's tokenizer.ggml.fim_*_token_id win over the vocabulary's texts (llama.cpp reads them first)."""
    import gguf

    from fitllm.loader.gguf_file import read_gguf
    from fitllm.loader.tokenizer import load_gguf_tokenizer

    path = tmp_path / "t.gguf"
    tokens = ["<s>", "</s>", "a", "b", "ab", "<PRE>", "<SUF>", "<MID>", "P", "S", "M"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    for role, tid in (("pre", 8), ("suf", 9), ("mid", 10)):
        w.add_uint32(f"tokenizer.ggml.fim_{role}_token_id", tid)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = load_gguf_tokenizer(read_gguf(path))
    fim = find_fim_tokens(tok)
    assert (fim.pre, fim.suf, fim.mid) == (8, 9, 10)  # not the <PRE> <SUF> <MID> texts


# ---- through HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen2", "glm"])
def code_server(request, tmp_path_factory):
    folder = (qwen_coder_checkpoint if request.param == "qwen2" else codegeex_checkpoint)(
        tmp_path_factory.mktemp(request.param)
    )
    engine = AsyncEngine(EngineConfig(model=str(folder), dtype="float32", max_model_len=256, block_size=16))
    with serve(engine, request.param) as s:
        s.folder = folder
        yield s


def test_infill_greedy_matches_transformers(code_server):
    """The random GLM / Qwen2 model fills the middle as transformers does on the same FIM prompt (greedy, up
    to the first token that ends a middle)."""
    tok = code_server.engine.served_model.tokenizer
    fim = find_fim_tokens(tok)
    ids = build_fim_prompt(tok, fim, PREFIX * 3, SUFFIX)
    body = {
        "input_prefix": PREFIX * 3,
        "input_suffix": SUFFIX,
        "n_predict": 8,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{code_server.url}/infill", json=body, timeout=120) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    got = [t for c in chunks[:-1] for t in c["tokens"]]
    ref, _ = hf_greedy(load_hf(code_server.folder), ids, 8)
    stops = set(fim.stop_ids) | set(tok.eos_token_ids)
    end = next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))
    assert len(set(ref)) > 1  # a varied reference, not one token repeated
    assert got == ref[:end] or got == ref[: end - 1]  # (the stop token itself may not be streamed)
    assert chunks[-1]["tokens_predicted"] == end


def test_infill_route(code_server):
    """/infill: the prompt the engine gets is the family's FIM prompt; llama.cpp's response shape; the
    second request with the same prefix is served from the prefix cache."""
    engine = code_server.engine
    tok = engine.served_model.tokenizer
    body = {
        "input_prefix": PREFIX * 4,
        "input_suffix": SUFFIX,
        "prompt": "c",
        "n_predict": 4,
        "temperature": 0,
    }
    body["input_extra"] = [{"filename": "a.py", "text": "X = 1\n"}]
    with AddTap(engine) as tap:
        r = httpx.post(f"{code_server.url}/infill", json=body, timeout=120)
        assert r.status_code == 200, r.text
        # the next keystroke: the prefix grows by a character
        again = httpx.post(
            f"{code_server.url}/infill", json=body | {"input_prefix": PREFIX * 4 + "c"}, timeout=120
        )
    out = r.json()
    expected = build_fim_prompt(
        tok, find_fim_tokens(tok), PREFIX * 4, SUFFIX, "c", [ExtraFile("X = 1\n", "a.py")]
    )
    assert tap.added[0][0] == expected
    assert out["stop"] is True and out["tokens_evaluated"] == len(expected)
    assert 1 <= out["tokens_predicted"] <= 4 and out["stop_type"] in ("eos", "limit")
    assert out["timings"]["cache_n"] + out["timings"]["prompt_n"] == len(expected)
    # every whole block (16 tokens) the two prompts share comes from the prefix cache
    second = tap.added[1][0]
    shared = next(i for i, (a, b) in enumerate(zip(expected, second)) if a != b)
    assert again.status_code == 200 and shared > 32
    assert again.json()["timings"]["cache_n"] == shared // 16 * 16


def test_infill_stream(code_server):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{code_server.url}/infill", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events]
    assert chunks[-1]["stop"] is True and all(c["stop"] is False for c in chunks[:-1])
    plain = httpx.post(f"{code_server.url}/infill", json=body | {"stream": False}, timeout=120).json()
    assert "".join(c["content"] for c in chunks) == plain["content"]


def test_completions_suffix(code_server):
    """`suffix` on /v1/completions through the openai client: the prompt is the prefix of a FIM prompt."""
    engine = code_server.engine
    tok = engine.served_model.tokenizer
    client = openai.OpenAI(base_url=f"{code_server.url}/v1", api_key="x", max_retries=0)
    with AddTap(engine) as tap:
        c = client.completions.create(
            model=code_server.name, prompt=PREFIX, suffix=SUFFIX, max_tokens=3, temperature=0
        )
    assert tap.added[0][0] == build_fim_prompt(tok, find_fim_tokens(tok), PREFIX, SUFFIX)
    assert set(find_fim_tokens(tok).stop_ids) <= set(tap.last_params.stop_token_ids)
    assert c.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="echo with suffix"):
        client.completions.create(model=code_server.name, prompt=PREFIX, suffix=SUFFIX, echo=True)


def test_model_without_fim_tokens_is_a_400(tmp_path, make_random_checkpoint):
    """A model without FIM tokens: a 400 that names it, on both routes."""
    folder = make_random_checkpoint(tmp_path)
    engine = AsyncEngine(EngineConfig(model=str(folder), dtype="float32", max_model_len=128))
    with serve(engine, "plain-llama") as s, httpx.Client(base_url=s.url, timeout=60) as http:
        err = assert_error(http.post("/infill", json={"input_prefix": "t1", "input_suffix": "t2"}), 400)
        assert "'plain-llama'" in err["message"] and "fill-in-the-middle" in err["message"]
        err = assert_error(http.post("/v1/completions", json={"prompt": "t1", "suffix": "t2"}), 400)
        assert err["param"] == "suffix" and "'plain-llama'" in err["message"]
