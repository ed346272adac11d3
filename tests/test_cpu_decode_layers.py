"""fitllm's C decode loop (fitllm/kernels/decode_layers.c, fitllm/model/cpu_decode_layers.py): a CPU decode
step's decoder layers in one call. Its logits equal those of PyTorch's layer loop on the same engine (the
reference, itself pinned to transformers by test_parity_hf), for every quantization whose kernels it calls,
with q/k/v bias, partial rotary and grouped-query attention, alone and in batches; steps outside its form
take PyTorch's path."""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_checkpoint, run_engine

from fitllm import Engine, EngineConfig, SamplingParams
from fitllm.model import cpu_decode_layers
from fitllm.model.cpu_decode_layers import CpuDecodeLayers
from fitllm.quant.cpu_kernels import bf16_kernel, int4_kernel

pytestmark = pytest.mark.skipif(
    bf16_kernel() is None or int4_kernel() is None,
    reason="fitllm's CPU kernels are not built here (no AVX-512 VNNI / BF16 / VBMI, or no C compiler)",
)

PROMPT = [5, 9, 33, 7, 81, 14, 3, 60, 22, 11, 40, 19, 8, 95, 27, 63, 70]  # one block and one token


def _engine(folder, quantization: str | None = None, **kw) -> Engine:
    """A bfloat16 CPU engine on `folder` (None: the default model)."""
    if folder is not None:
        kw["model"] = str(folder)
    return Engine(EngineConfig(dtype="bfloat16", device="cpu", quantization=quantization, **kw))


def _count_runs(monkeypatch) -> list[bool]:
    """Records, per forward that asked, whether the loop served the step."""
    served: list[bool] = []
    run = CpuDecodeLayers.run

    def counted(self, *a):
        out = run(self, *a)
        served.append(out is not None)
        return out

    monkeypatch.setattr(CpuDecodeLayers, "run", counted)
    return served


def _without_loop(monkeypatch) -> None:
    monkeypatch.setattr(CpuDecodeLayers, "build", classmethod(lambda cls, model: None))


@pytest.mark.parametrize(
    "family, quantization, overrides, engine_kw",
    [
        ("llama", None, {}, {}),
        ("llama", "int8", {}, {}),
        ("llama", "int4", {}, {}),
        ("qwen2", "int4", {}, {}),  # q/k/v bias
        ("llama", None, {"attention_bias": True}, {}),  # o_proj bias too
        ("llama", "int8", {"head_dim": 32, "partial_rotary_factor": 0.5}, {}),  # rotary on half of each head
        (
            "llama",
            "int4",
            {"head_dim": 32},
            {},
        ),  # rotary 16 channels at a time (half a head a multiple of 16)
        ("llama", "int4", {}, {"kv_cache_dtype": "int8"}),  # K/V encoded into an int8 cache by the loop
    ],
)
def test_the_loop_equals_the_pytorch_layers(
    tmp_path, monkeypatch, family, quantization, overrides, engine_kw
):
    """Greedy decode through the loop and through PyTorch's layers: the same tokens, and each step's logits
    equal bit for bit, or within one bfloat16 step of a hidden value where SiLU's exp differs in its last
    float32 bit (a rare tie in the rounding)."""
    folder = make_random_checkpoint(tmp_path, family, **overrides)
    served = _count_runs(monkeypatch)
    tokens, logits = run_engine(_engine(folder, quantization, **engine_kw), PROMPT, 24)
    assert sum(served) >= 22, f"the loop served {sum(served)} of 23 decode steps"
    monkeypatch.undo()
    _without_loop(monkeypatch)
    want_tokens, want_logits = run_engine(_engine(folder, quantization, **engine_kw), PROMPT, 24)
    assert len(set(want_tokens)) >= 4, want_tokens
    assert tokens == want_tokens
    exact = sum(torch.equal(a, b) for a, b in zip(logits, want_logits))
    assert exact >= len(logits) - 2, f"only {exact} of {len(logits)} steps bit-identical"
    for a, b in zip(logits, want_logits):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("num", [3, 21])
def test_a_batch_of_requests_at_different_lengths(tmp_path, monkeypatch, num):
    """Requests decoding together, each at its own context length (the attention's lengths mask), produce
    the tokens each produces through PyTorch's layers: 3, and 21 (more than 16 rows: int4's kernels take up
    to 47)."""
    folder = make_random_checkpoint(tmp_path, "llama")
    prompts = [(PROMPT * 3)[i : i + 4 + 3 * i] for i in range(num)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def generate(engine: Engine) -> list[list[int]]:
        ids = [engine.add_request(p, params) for p in prompts]
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = list(out.outputs[0].token_ids)
        return [done[i] for i in ids]

    served = _count_runs(monkeypatch)
    got = generate(_engine(folder, "int4"))
    assert sum(served) >= 15
    monkeypatch.undo()
    _without_loop(monkeypatch)
    assert got == generate(_engine(folder, "int4"))


@pytest.mark.parametrize(
    "dtype, kw",
    [
        ("float32", {}),  # the loop is bfloat16
        ("bfloat16", {"kv_cache_dtype": "fp8"}),  # a float8 cache (int8 is in the loop's form)
    ],
)
def test_steps_outside_its_form_take_pytorch_path(tmp_path, monkeypatch, dtype, kw):
    folder = make_random_checkpoint(tmp_path, "llama")
    served = _count_runs(monkeypatch)
    engine = Engine(EngineConfig(model=str(folder), dtype=dtype, device="cpu", **kw))
    tokens, _ = run_engine(engine, PROMPT, 6)
    assert len(tokens) == 6
    assert not any(served)


def test_a_sliding_window_past_its_width_takes_pytorch_path(tmp_path, monkeypatch):
    """Mistral's window masks more than each request's length once the context passes it: the decode group
    has no `lengths`, and the loop declines those steps."""
    folder = make_random_checkpoint(tmp_path, "mistral", sliding_window=20)
    served = _count_runs(monkeypatch)
    tokens, logits = run_engine(_engine(folder), PROMPT, 10)
    # two prefills (the profile step's and the prompt's), decodes at contexts 18-20 in the window, then past it
    assert served[2:5] == [True] * 3 and not any(served[5:])
    monkeypatch.undo()
    _without_loop(monkeypatch)
    assert run_engine(_engine(folder), PROMPT, 10)[0] == tokens


def test_a_layer_no_kernel_serves_leaves_the_model_to_pytorch(tmp_path, monkeypatch):
    """One linear whose method has no kernel for decode rows (here: its rule says so) and the plan is not
    made at all: the whole step stays on PyTorch's path."""
    from fitllm.quant.base import UnquantizedMethod

    folder = make_random_checkpoint(tmp_path, "llama")
    monkeypatch.setattr(UnquantizedMethod, "cpu_linear", lambda self, layer, rows: None)
    engine = _engine(folder)
    run_engine(engine, PROMPT, 4)
    assert engine.runner.model._cpu_decode == [None]


@pytest.mark.parametrize("quantization, rows", [(None, 16), ("int8", 31), ("int4", 47)])
def test_each_models_rows_are_what_its_kernels_take(tmp_path, monkeypatch, quantization, rows):
    """A model's row limit is the most rows every linear's kernel serves by its method's own rule (bfloat16:
    BF16_KERNEL_ROWS; int8: kernel_rows of a small layer, exclusive; int4: SCRATCH_ROWS, exclusive), so a
    step larger than that takes PyTorch's layers, whose linears would change path."""
    folder = make_random_checkpoint(tmp_path, "llama")
    engine = _engine(folder, quantization)
    run_engine(engine, PROMPT, 3)
    plan = engine.runner.model._cpu_decode[0]
    assert plan is not None and plan.max_rows == rows <= cpu_decode_layers.MAX_ROWS


def test_it_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FITLLM_DECODE_LOOP", "0")
    folder = make_random_checkpoint(tmp_path, "llama")
    engine = _engine(folder)
    run_engine(engine, PROMPT, 3)
    assert engine.runner.model._cpu_decode == [None]


def test_the_default_model_decodes_the_same_tokens(monkeypatch):
    """The real SmolLM2 GGUF, int4 (its Q4_1 codes) and bfloat16: 48 greedy tokens through the loop are
    those of PyTorch's layers."""
    path = None
    for quantization in ("int4", None):
        served = _count_runs(monkeypatch)
        got, _ = run_engine(_engine(path, quantization, max_model_len=512), list(range(400, 460)), 48)
        assert sum(served) >= 40
        monkeypatch.undo()
        _without_loop(monkeypatch)
        want, _ = run_engine(_engine(path, quantization, max_model_len=512), list(range(400, 460)), 48)
        monkeypatch.undo()
        assert got == want, quantization


def test_compile_decode_leaves_the_loops_steps_to_it(tmp_path, monkeypatch):
    """With --compile-decode, steps the loop takes are not compiled (the loop is faster than the graph, and
    compiling them would only cost start-up): no graph is built for batch 1, and the loop serves it."""
    folder = make_random_checkpoint(tmp_path, "llama")
    served = _count_runs(monkeypatch)
    engine = _engine(folder, "int8", compile_decode=True)
    tokens, _ = run_engine(engine, PROMPT, 8)
    assert len(tokens) == 8 and sum(served) >= 7
    assert engine.runner.compiled is not None and engine.runner.compiled.compiled_sizes == set()


def test_quantization_auto_keeps_a_gguf_own_codes(tmp_path):
    """The default --quantization auto runs the default model's Q4_1 GGUF as int4 (its codes kept, group
    32), and a float checkpoint in the model dtype; `fitllm plan`'s engine plan resolves it the same way."""
    from fitllm.loader import open_model
    from fitllm.quant import get_quant_method, resolve_quantization

    assert EngineConfig().quantization == "auto"
    source = open_model(None)
    assert source.config.linear_block_type == "Q4_1"
    method = get_quant_method("auto", config=source.config)
    assert method.name == "int4" and method.group_size == 32
    assert resolve_quantization("auto", "Q8_0") == "int8" and resolve_quantization("auto", None) == "none"
    assert resolve_quantization("int8", "Q4_1") == "int8"  # a chosen method is kept
    folder = make_random_checkpoint(tmp_path, "llama")
    engine = _engine(folder, "auto")
    assert engine.config.quantization == "none" and engine.quant.name == "none"
