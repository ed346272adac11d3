"""`fitllm bench fullsize`: a model at its published size, in random weights, planned and then measured.

No checkpoint can be downloaded, so the published `config.json` (the fixtures in tests/fixtures, e.g. the
13B fairseq-dense and the 9B GLM-4) is built in transformers with random weights and saved once, in
transformers' native safetensors layout (a ChatGLM config is saved as `GlmForCausalLM`; loading the ChatGLM
layout itself is checked bitwise against the native one in tests/test_chatglm.py); fitllm
then loads it under `--memory-budget` (quantizing while loading), runs one request of `--prompt-tokens`
plus `--decode-tokens`, and reports what `fitllm plan` predicted beside what was held: the ledger's
weights and peak, and on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`). On CPU it runs
too (on a small config), which is how it is tested; the figures that matter are the GPU's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--config", type=Path, required=True, help="a published config.json (HF or ChatGLM)")
    g.add_argument(
        "--checkpoint-dir", type=Path, default=Path("/tmp/fitllm-fullsize"), help="where it is saved"
    )
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="float16", help="dtype of the saved checkpoint and of fitllm")
    g.add_argument("--quantization", default="int8")
    g.add_argument("--memory-budget", default="24GiB")
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument("--prompt-tokens", type=int, default=2048)
    g.add_argument("--decode-tokens", type=int, default=16)
    g.add_argument("--json", type=Path, default=None, help="write the results as JSON")


def hf_config(path: Path):
    """The transformers config a published config.json describes (ChatGLM as transformers' GLM)."""
    import transformers

    from fitllm.loader.chatglm import chatglm_to_glm_config, is_chatglm

    raw = json.loads(path.read_text())
    if is_chatglm(raw):
        raw = {**chatglm_to_glm_config(raw), "pad_token_id": raw.get("pad_token_id")}
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path", "transformers_version")}
    return transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)


def random_checkpoint(config_path: Path, folder: Path, dtype: torch.dtype) -> Path:
    """The model of `config_path` saved with random weights in `dtype` (reused when already there)."""
    from benchmarks.random_weights import save_random_checkpoint

    name = f"{config_path.parent.name}-{str(dtype).removeprefix('torch.')}"
    return save_random_checkpoint(hf_config(config_path), folder / name, dtype)


def run(args: argparse.Namespace) -> int:
    from fitllm.config import EngineConfig
    from fitllm.engine.engine import Engine
    from fitllm.engine.request import SamplingParams
    from fitllm.loader import open_model
    from fitllm.memory.budget import resolve_budget
    from fitllm.plan.memory_plan import MemoryPlan
    from fitllm.plan.planner import DEFAULT_OVERHEAD

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.prompt_tokens + args.decode_tokens > args.max_model_len:
        # Checked before the checkpoint is built: on a GPU that takes minutes.
        print(f"fitllm: error: --prompt-tokens {args.prompt_tokens} + --decode-tokens {args.decode_tokens} "
              f"exceed --max-model-len {args.max_model_len}; lower --prompt-tokens")  # fmt: skip
        return 2
    start = time.perf_counter()
    folder = random_checkpoint(args.config, args.checkpoint_dir, dtype)
    saved_s = time.perf_counter() - start
    quantization = None if args.quantization == "none" else args.quantization
    budget = resolve_budget(args.memory_budget, device)
    source = open_model(str(folder))
    engine_config = EngineConfig(
        model=str(folder),
        device=args.device,
        dtype=args.dtype,
        quantization=quantization,
        memory_budget=budget,
        max_model_len=args.max_model_len,
    )
    # The plan of the engine below, from its own config (as `fitllm plan` plans it).
    plan = MemoryPlan.for_engine(engine_config, source.config, device, overhead=DEFAULT_OVERHEAD).report(
        args.config.parent.name
    )
    source.release()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    engine = Engine(engine_config)
    load_s = time.perf_counter() - start
    load_peak = run_peak = None
    if device.type == "cuda":
        load_peak = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, apart from loading's
    vocab = source.config.vocab_size
    prompt = [(7 * i) % (vocab - 3) + 3 for i in range(args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    tokens = []
    for out in engine.stream(prompt, params):
        tokens = out.outputs[0].token_ids
    if device.type == "cuda":
        run_peak = torch.cuda.max_memory_allocated(device) - base
    ledger = engine.ledger.snapshot()
    kv_run = engine.kv_bytes_per_token * (args.prompt_tokens + args.decode_tokens)
    planned = plan.resident_weight_bytes + plan.staging_bytes + plan.workspace + plan.graph_pool + kv_run
    result = {
        "model": args.config.parent.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "quantization": args.quantization,
        "budget": budget,
        "tokens": args.prompt_tokens + len(tokens),
        "planned": {
            "weights": plan.resident_weight_bytes,
            "workspace": plan.workspace,
            "graph_pool": plan.graph_pool,
            "staging": plan.staging_bytes,
            "kv_for_this_request": kv_run,
            "total": planned,
            "fits": plan.fits,
            "kv_capacity_tokens": plan.kv_capacity_tokens,
        },
        # By tag at its peak; KV is held in whole slabs, so it is at least the request's KV.
        "ledger": {"peak_by_tag": ledger.peak, "peak_total": ledger.peak_total},
        "allocator_peak_load": load_peak,
        "allocator_peak_run": run_peak,
        "seconds": {"save_checkpoint": saved_s, "load": load_s},
    }
    gib = 1 << 30
    print(f"{result['model']} ({args.dtype}, {args.quantization}) on {result['device']}, "
          f"budget {budget / gib:.2f} GiB, one request of {result['tokens']} tokens")  # fmt: skip
    print(f"  planned: weights {plan.resident_weight_bytes / gib:.2f} GiB + staging {plan.staging_bytes / gib:.2f} "
          f"+ workspace {plan.workspace / gib:.2f} + CUDA graph pool {plan.graph_pool / gib:.3f} "
          f"+ KV {kv_run / gib:.3f} = {planned / gib:.2f} GiB; fits: {plan.fits}")  # fmt: skip
    print(
        f"  ledger peak: {ledger.peak_total / gib:.2f} GiB ("
        + ", ".join(f"{tag} {n / gib:.3f}" for tag, n in ledger.peak.items() if n)
        + "; KV in whole slabs)"
    )
    if run_peak is not None:
        # The ledger holds whole KV slabs and the CUDA-graph pool: the allocator is checked against it.
        print(f"  CUDA allocator peak: load {load_peak / gib:.2f} GiB, run {run_peak / gib:.2f} GiB "
              f"({run_peak / ledger.peak_total:.3f} of the ledger's peak)")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
