"""`--compile-decode` (fitllm/engine/compiled_decode.py): the compiled CPU decode forward against transformers
on the same weights, and its fallback logic with stand-in compilers (a compiler that fails, one that works
and later raises)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, load_hf, make_random_checkpoint, run_engine

from fitllm import Engine, EngineConfig, SamplingParams
from fitllm.engine.compiled_decode import MAX_COMPILED_BATCH, CompiledDecode, compile_decode_refusal
from fitllm.model.attention import TorchMetadata
from fitllm.model.attention.step_op import opaque_attention

NEW_TOKENS = 12


def _prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 * seed + length)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _engine(folder, **kw) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype="float32", device="cpu", **kw))


def _greedy_batch(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    rids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[r] for r in rids]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("compiled"), "llama", seed=7)


def test_compiled_decode_matches_transformers_at_batch_1_and_batched(llama):
    """The real inductor compile: batch-1 steps (their own graph, compiled at start-up over a scratch cache)
    give transformers' greedy tokens and logits; a batch of three (the dynamic graph) gives the eager
    engine's tokens."""
    hf = load_hf(llama)
    engine = _engine(llama, compile_decode=True)
    compiled = engine.runner.compiled
    assert compiled is not None
    assert (
        compiled.compiled_sizes == {1} and compiled.failed is None
    )  # compiled at start-up, not at a request
    for n in (5, 17):  # inside one KV block, past one
        prompt = _prompt(n, hf.config.vocab_size)
        want_tokens, want_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert len(set(want_tokens)) >= 4, want_tokens  # a degenerate model would match anything
        tokens, logits = run_engine(engine, prompt, NEW_TOKENS)
        assert tokens == want_tokens, f"prompt of {n}"
        for a, b in zip(logits, want_logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert compiled.failed is None and 1 in compiled.compiled_sizes
    prompts = [_prompt(n, hf.config.vocab_size, seed=1) for n in (3, 20, 33)]
    eager = _greedy_batch(_engine(llama), prompts)
    assert _greedy_batch(engine, prompts) == eager
    assert compiled.failed is None and max(compiled.compiled_sizes) >= 2
    engine.check_integrity()


def _failing_compiler(calls: list[str]):
    def compiler(fn, **kw):
        def run(*args):
            calls.append("compiled")
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    return compiler


def _working_then_raising_compiler(calls: list[str], fail_from: int):
    """Runs the traced function eagerly (what a compiled graph computes) until call `fail_from`, then raises
    as a step's own runtime error would."""

    def compiler(fn, **kw):
        def run(*args):
            calls.append("compiled")
            if len(calls) >= fail_from:
                raise RuntimeError("a step's own failure")
            return fn(*args)

        return run

    return compiler


def test_a_failed_compile_falls_back_to_eager_and_is_not_retried(llama):
    calls: list[str] = []
    engine = _engine(llama)
    engine.runner.compiled = CompiledDecode(engine.model, compiler=_failing_compiler(calls))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    got = _greedy_batch(engine, prompts[:1]) + _greedy_batch(engine, prompts[1:])
    assert got == _greedy_batch(_engine(llama), prompts[:1]) + _greedy_batch(_engine(llama), prompts[1:])
    assert calls == ["compiled"]  # tried once, at the first decode step; every later step ran eagerly
    assert "InvalidCxxCompiler" in engine.runner.compiled.failed


def test_the_stand_in_compiled_forward_runs_the_steps_and_a_later_error_propagates(llama):
    """Once a size has compiled, its steps go through the compiled forward (here the traced function run
    eagerly, with attention through the opaque operator's eager kernel), and an error there is the step's
    own: it is raised, not hidden by a fallback."""
    calls: list[str] = []
    engine = _engine(llama)
    compiled = CompiledDecode(engine.model, compiler=_working_then_raising_compiler(calls, fail_from=10**9))
    engine.runner.compiled = compiled
    prompt = [5, 6, 7, 8, 9, 10]
    assert _greedy_batch(engine, [prompt]) == _greedy_batch(_engine(llama), [prompt])
    assert len(calls) == NEW_TOKENS - 1  # every decode step (the first token came from the prefill)
    assert compiled.compiled_sizes == {1} and compiled.failed is None

    calls.clear()
    engine = _engine(llama)
    compiled = CompiledDecode(engine.model, compiler=_working_then_raising_compiler(calls, fail_from=3))
    engine.runner.compiled = compiled
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    while engine.has_unfinished_requests():
        outs = engine.step()
        for out in outs:
            if out.finished:
                final = out
    assert final.request_id == rid and final.outputs[0].finish_reason == "error"
    assert compiled.failed is None  # a step's error is not a compiler failure


def test_which_steps_the_compiled_forward_serves(llama):
    engine = _engine(llama)
    compiled = CompiledDecode(engine.model, compiler=lambda fn, **kw: fn)
    decode = TorchMetadata(slot_mapping=None, num_decodes=2)  # type: ignore[arg-type]
    assert compiled.can_run(decode, 2)
    assert not compiled.can_run(decode, 3)  # a prefill's tokens ride along
    decode.prefills.append(object())  # type: ignore[arg-type]
    assert not compiled.can_run(decode, 2)
    big = TorchMetadata(slot_mapping=None, num_decodes=MAX_COMPILED_BATCH + 1)  # type: ignore[arg-type]
    assert not compiled.can_run(big, MAX_COMPILED_BATCH + 1)
    compiled.failed = "broken"
    assert not compiled.can_run(TorchMetadata(slot_mapping=None, num_decodes=1), 1)  # type: ignore[arg-type]


def test_compile_decode_is_refused_where_it_cannot_serve(llama):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_decode_refusal(cpu, "torch", streamed=False, tp=False) is None
    assert "CPU" in compile_decode_refusal(cuda, "torch", streamed=False, tp=False)
    assert "triton" in compile_decode_refusal(cpu, "triton", streamed=False, tp=False)
    assert "streamed" in compile_decode_refusal(cpu, "torch", streamed=True, tp=False)
    assert "tensor" in compile_decode_refusal(cpu, "torch", streamed=False, tp=True)
    assert _engine(llama).runner.compiled is None  # off by default


def test_the_opaque_attention_needs_a_bound_step():
    q = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="bound_step"):
        opaque_attention(q, q[:, :2], q[:, :2], 0)


def test_two_models_in_one_process_keep_their_own_graphs(llama, tmp_path):
    """Dynamo keeps graphs per code object and the module guards are dropped: without a code object per
    CompiledDecode, a deeper model compiled after a shallower one ran the shallower one's graph."""
    deeper = make_random_checkpoint(tmp_path, "llama", seed=8, num_hidden_layers=4)
    prompts = [[5, 6, 7, 8, 9]]
    for folder in (llama, deeper):  # llama's graph first, then the deeper model's
        compiled_engine = _engine(folder, compile_decode=True)
        assert compiled_engine.runner.compiled.failed is None
        assert _greedy_batch(compiled_engine, prompts) == _greedy_batch(_engine(folder), prompts)


def test_the_step_probe_times_a_compiled_forward_as_forward(llama):
    """`bench quant` / `bench step` split each step with StepProbe: a compiled step's forward (which bypasses
    model.forward) is counted as forward, not as host time."""
    from benchmarks.step_probe import StepProbe

    engine = _engine(llama)
    engine.runner.compiled = CompiledDecode(engine.model, compiler=lambda fn, **kw: fn)
    engine.add_request([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()  # the prefill: eager, through model.forward
    probe = StepProbe.attach(engine)
    engine.step()
    assert engine.runner.compiled.compiled_sizes == {1}  # the decode step went through the compiled forward
    assert probe.seconds["forward"] > 0
