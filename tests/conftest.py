"""Shared helpers: tiny random-weight Hugging Face checkpoints that fitllm and transformers both load.

`make_random_checkpoint(tmp_path, family="llama", **overrides) -> Path` is a plain function (import it with
`from conftest import make_random_checkpoint`) and also a fixture of the same name that returns it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it decorates kernels: set it before anything imports triton, so that
# without a GPU the Triton attention kernels run (interpreted) on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stand_ins import LogitsTap  # noqa: E402

from fitllm.engine.request import SamplingParams  # noqa: E402

# Tiny models on a shared 2-core machine: more than one intra-op thread only adds contention (measured
# 10-100x slower under load), and results do not depend on it.
torch.set_num_threads(1)

# Wide init and perturbed norms: with transformers' default std 0.02 a tiny model repeats one token forever.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.25,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "glm": ("GlmConfig", "GlmForCausalLM"),
    "xglm": ("XGLMConfig", "XGLMForCausalLM"),
}


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def write_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A WordLevel tokenizer.json whose ids are exactly 0..vocab_size-1 ("t0", "t1", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def build_random_model(family: str = "llama", seed: int = 0, **overrides):
    """A transformers model of `family` with wide random weights, random RMSNorm gains and biases."""
    import transformers

    config_name, model_name = _FAMILIES[family]
    kwargs = dict(TINY_CONFIG)
    if family == "mistral":
        kwargs["sliding_window"] = None
    if family == "glm":  # GLM-4's defaults are the 9B's: size them down (rotary stays on half of each head)
        kwargs.update(head_dim=16, pad_token_id=0)
    if family == "xglm":  # XGLM's own field names; no GQA (multi-head attention only)
        kwargs = dict(
            d_model=kwargs["hidden_size"], num_layers=kwargs["num_hidden_layers"],
            attention_heads=kwargs["num_attention_heads"], ffn_dim=kwargs["intermediate_size"],
            vocab_size=kwargs["vocab_size"], max_position_embeddings=kwargs["max_position_embeddings"],
            init_std=kwargs["initializer_range"], bos_token_id=kwargs["bos_token_id"], eos_token_id=kwargs["eos_token_id"],
            pad_token_id=1,
        )  # fmt: skip
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # transformers initialises biases to zero: make them matter
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
    return model


def make_random_checkpoint(
    tmp_path: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    save_kwargs: dict | None = None,
    name: str | None = None,
    **overrides,
) -> Path:
    """Save a random `family` model (config overrides as keyword args) plus a tokenizer.json; returns the folder."""
    model = build_random_model(family, seed=seed, **overrides)
    folder = Path(tmp_path) / (name or f"{family}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **(save_kwargs or {}))
    write_tokenizer(folder, model.config.vocab_size)
    return folder


@pytest.fixture(name="make_random_checkpoint")
def _make_random_checkpoint_fixture():
    """Fixture form of make_random_checkpoint (returns the function)."""
    return make_random_checkpoint


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    """The reference: transformers' own model from the same folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def write_random_gguf(path: Path, linear_type: str = "Q8_0", seed: int = 0, **overrides):
    """A random Llama (build_random_model) written as a GGUF file the way llama.cpp's converter writes one:
    q/k rows permuted for interleaved rope, decoder linears in `linear_type` (quantized by the `gguf`
    package), everything else float32, and a small byte-level BPE vocabulary. Returns the HF model."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    model = build_random_model("llama", seed=seed, **overrides)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    tokens = ["<s>", "</s>", "a", "b", "ab"] + [f"x{i}" for i in range(cfg.vocab_size - 5)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # 3: control
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    gguf_names = {v: k for k, v in _GGUF_LAYER_NAMES.items()}
    qtype = gguf.GGMLQuantizationType[linear_type]
    for name, p in model.state_dict().items():
        w = p.float().numpy()
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{gguf_names[module]}.{suffix}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's permutation
                heads = cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads
                w = (
                    w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
                    .swapaxes(1, 2)
                    .reshape(w.shape)
                )
            if w.ndim == 2:
                writer.add_tensor(gname, quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
                continue
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]  # fmt: skip
        writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


@torch.inference_mode()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    """Float32 logits of the last position of a full-sequence forward (no KV cache)."""
    out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0, -1].float()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by repeated full-sequence forwards; returns the tokens and each step's logits."""
    ids, logits = list(prompt), []
    for _ in range(n):
        row = hf_last_logits(model, ids)
        logits.append(row)
        ids.append(int(row.argmax()))
    return ids[len(prompt) :], logits


def run_engine(engine, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy-generate with a fitllm Engine, capturing the float32 logits of every step that sampled."""
    from fitllm import SamplingParams

    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    logits: list[torch.Tensor] = []
    tokens: list[int] = []
    with LogitsTap(engine) as tap:
        while engine.has_unfinished_requests():
            tap.last = {}
            for out in engine.step():
                if out.request_id == rid and out.outputs[0].delta_token_ids:
                    assert len(out.outputs[0].delta_token_ids) == 1
                    logits.append(tap.last[rid])
                    tokens = list(out.outputs[0].token_ids)
    return tokens, logits


def run_streamed(engine, prompts, params) -> tuple[list, list[str]]:
    """Run to the end with the pool's integrity and the budget checked after every step: the final
    RequestOutput of each prompt, in order, and the text its deltas streamed."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done, deltas, steps = {}, {r: "" for r in rids}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas[out.request_id] += out.outputs[0].delta_text
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        assert engine.ledger.total <= engine.ledger.budget
        steps += 1
        assert steps < 3000
    assert engine.pool.num_used_blocks == 0
    return [done[r] for r in rids], [deltas[r] for r in rids]


def run_all(
    engine, prompts, priorities=None, on_step=None, params=GREEDY, logits: list | None = None
) -> list[list[int]]:
    """Run `prompts` to the end (greedily unless `params`, one SamplingParams or one per prompt, says
    otherwise), checking the pool's integrity and the budget after every step; the token ids of each, in
    order. With a `logits` list, each prompt's float32 logits of every sampled token are appended to it."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    ids = [
        engine.add_request(p, per_prompt[i], priority=0 if priorities is None else priorities[i])
        for i, p in enumerate(prompts)
    ]
    tap = LogitsTap(engine) if logits is not None else None
    rows: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
    done = {}
    try:
        while engine.has_unfinished_requests():
            if tap is not None:
                tap.last = {}
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            for rid, row in tap.last.items() if tap is not None else ():
                if rid in rows:  # (requests added before this call may sample too)
                    rows[rid].append(row)
            engine.check_integrity()
            assert engine.ledger.total <= engine.ledger.budget
            if on_step is not None:
                on_step(engine)
    finally:
        if tap is not None:
            tap.close()
    if logits is not None:
        logits.extend(rows[i] for i in ids)
    return [done[i] for i in ids]


def assert_greedy_parity(
    got: list[list[int]],
    ref: list[list[int]],
    got_logits: list[list[torch.Tensor]],
    ref_logits: list[list[torch.Tensor]],
    rel: float,
) -> int:
    """Two backends' greedy runs of the same prompts agree: step by step, logits within `rel` of the largest
    |logit| and the same token, up to the reference's first near-tie (its top two logits within twice that
    tolerance). Past a near-tie either token is right, and a GPU's rounding (bfloat16 probabilities before
    P.V, other summation orders) may pick the other one, so the runs may part there. Returns the steps
    compared."""
    compared = 0
    for n, (g, r, gl, rl) in enumerate(zip(got, ref, got_logits, ref_logits, strict=True)):
        assert len(gl) == len(g) and len(rl) == len(r), f"request {n}: a step without logits"
        for step, (a, b) in enumerate(zip(gl, rl)):
            tol = rel * b.abs().max().item()
            diff = (a - b).abs().max().item()
            assert diff <= tol, f"request {n}, step {step}: logits differ by {diff:.3g} > {tol:.3g}"
            top = b.topk(2).values
            if (top[0] - top[1]).item() <= 2 * tol:
                break  # a near-tie: the continuations may part from here on
            assert g[step] == r[step], f"request {n}, step {step}: token {g[step]} vs {r[step]}"
            compared += 1
        else:
            assert len(g) == len(r), f"request {n}: {len(g)} tokens vs {len(r)}"
    return compared


@functools.cache
def fixed_and_block_bytes(folder: Path, **shape) -> tuple[int, int]:
    """For a float32 engine on `folder` (max_model_len 128 unless `shape` says otherwise, with its
    block_size; planned workspace): the ledger's weights + workspace bytes, and the bytes of one KV block.
    Tight-budget tests size their budgets from these."""
    from fitllm.config import EngineConfig
    from fitllm.engine.engine import Engine

    cfg = dict(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    probe = Engine(EngineConfig(**(cfg | shape)))
    return probe.ledger.current("weights") + probe.ledger.current("workspace"), probe.storage.block_bytes


def tight_engine(
    folder: Path, kv_blocks: int, slab_blocks: int = 2, max_model_len: int = 128, block_size: int = 16, **kw
):
    """A float32 engine on `folder` whose budget holds exactly `kv_blocks` KV blocks beyond its weights and
    workspace, in slabs of `slab_blocks`: the tests that need preemption, swap or retention under pressure."""
    from fitllm.config import EngineConfig
    from fitllm.engine.engine import Engine

    shape = dict(max_model_len=max_model_len, block_size=block_size)
    fixed, per_block = fixed_and_block_bytes(folder, **shape)
    return Engine(
        EngineConfig(
            model=str(folder),
            dtype="float32",
            **shape,
            memory_budget=fixed + kv_blocks * per_block,
            kv_slab_size=slab_blocks * per_block,
            profile_workspace=False,
            **kw,
        )
    )


# ---- a live fitllm server on the default model (tests/test_server*.py) -------------------------------------

# quantization "none": the server tests were written against the default model dequantized (auto keeps its Q4_1
# codes, and some of their prompts rely on the exact bfloat16 text)
SERVER_CONFIG = dict(dtype="bfloat16", quantization="none", max_model_len=512, max_num_seqs=8, seed=0)


@pytest.fixture(scope="module")
def server():
    """The default model behind a real uvicorn server (module-scoped)."""
    from live_server import serve

    from fitllm.config import EngineConfig
    from fitllm.engine.async_engine import AsyncEngine
    from fitllm.server.app import default_model_name

    with serve(AsyncEngine(EngineConfig(**SERVER_CONFIG)), default_model_name(None)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
