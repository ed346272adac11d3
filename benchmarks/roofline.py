"""`fitllm bench roofline`: batch-1 decode tokens/s against the memory-bandwidth roofline, fitllm (CUDA graphs
and eager) vs transformers `generate`, on a random-weight Llama of a chosen size.

At batch 1 every decode step reads all resident weights and the request's K/V once, so tokens/s cannot
exceed bandwidth / (weight bytes + context x KV bytes per token). The bandwidth is measured here (a large
device-to-device copy, read + write bytes over time). The checkpoint is built with random weights (nothing can
be downloaded) and saved once under --checkpoint-dir, so transformers and fitllm load the same tensors.
Made for a CUDA GPU; on CPU it runs the same way (e.g. --size tiny) to check the benchmark itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Llama-architecture sizes: Llama 3.2 1B and Llama 3.1 8B shapes; tiny for checking the benchmark on CPU.
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--size", choices=list(SIZES), default="1b", help="random-weight Llama shape")
    g.add_argument(
        "--checkpoint-dir", type=Path, default=Path("/tmp/fitllm-roofline"), help="where it is saved"
    )
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--quantizations", default="none,int8", help="comma-separated --quantization values")
    g.add_argument("--prompt-tokens", type=int, default=512)
    g.add_argument("--decode-tokens", type=int, default=128, help="tokens timed after the first")
    g.add_argument("--no-hf", action="store_true", help="skip transformers")
    g.add_argument("--json", type=Path, default=None, help="write the results as JSON")


def random_checkpoint(size: str, folder: Path, dtype: torch.dtype) -> Path:
    """A saved random-weight LlamaForCausalLM of `size` (reused when already there)."""
    from transformers import LlamaConfig

    from benchmarks.random_weights import save_random_checkpoint

    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SIZES[size])
    return save_random_checkpoint(config, folder / f"llama-{size}-{str(dtype).removeprefix('torch.')}", dtype)


def decode_bytes_per_token(
    weight_bytes: int, embedding_bytes: int, tied: bool, context: float, kv_bytes_per_token: int
) -> float:
    """Bytes one batch-1 decode step must read: every resident weight once, except an untied input embedding
    (a step gathers one row of it; the LM head reads a tied one whole), plus the context's K and V. This is
    the roofline's denominator: counting the untied embedding (1.05 GB of the 8B's 16 GB) would make
    every fraction of the roofline about 7% too high."""
    read = weight_bytes - (0 if tied else embedding_bytes)
    return read + context * kv_bytes_per_token


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_engine(
    folder: Path, args: argparse.Namespace, quantization: str, eager: bool, async_scheduling: str
):
    """The engine every batch-1 decode figure uses (also scripts/gpu_check/roofline_compact.py)."""
    from fitllm.config import EngineConfig
    from fitllm.engine.engine import Engine

    return Engine(
        EngineConfig(
            model=str(folder),
            device=args.device,
            dtype=args.dtype,
            quantization=None if quantization == "none" else quantization,
            max_model_len=args.prompt_tokens + args.decode_tokens + 1 + 16,
            max_num_seqs=8,
            enforce_eager=eager,
            async_scheduling=async_scheduling,
        )
    )


def time_decode(engine, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds for args.decode_tokens tokens after the first, bytes each step reads) of one batch-1
    request, the second of two passes."""
    from fitllm.engine.request import SamplingParams

    n = args.decode_tokens + 1
    prompt = [(7 * i) % 1000 + 3 for i in range(args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for _ in range(2):  # the first pass warms up (Triton compiles, allocator settles)
        engine.add_request(prompt, params)
        engine.step()  # prefill and the first token
        _sync(engine.device)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _sync(engine.device)
        seconds = time.perf_counter() - start
    embedding = engine.model.embed_tokens.weight
    bytes_per_token = decode_bytes_per_token(
        engine.ledger.current("weights"),
        embedding.numel() * embedding.element_size(),
        engine.model_config.tie_word_embeddings,
        args.prompt_tokens + n / 2,  # the mean context over the run
        engine.kv_bytes_per_token,
    )
    return seconds, bytes_per_token


def fitllm_decode(
    folder: Path, args: argparse.Namespace, quantization: str, eager: bool, async_scheduling: str
) -> dict:
    """Batch-1 decode tokens/s (after the first token) and the bytes each step reads."""
    engine = decode_engine(folder, args, quantization, eager, async_scheduling)
    seconds, bytes_per_token = time_decode(engine, args)
    result = dict(
        system="fitllm",
        quantization=quantization,
        cuda_graphs=engine.graphs is not None,
        async_scheduling=engine.async_scheduling,
        attention_backend=engine.attention_backend,
        tokens_per_s=args.decode_tokens / seconds,
        bytes_per_token=bytes_per_token,
    )
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def hf_decode(folder: Path, args: argparse.Namespace) -> dict:
    """transformers `generate` at batch 1: (time for 1 + N tokens - time for 1 token) / N."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(args.device).eval()
    ids = torch.tensor([[(7 * i) % 1000 + 3 for i in range(args.prompt_tokens)]], device=args.device)

    def timed(new: int) -> float:
        _sync(torch.device(args.device))
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync(torch.device(args.device))
        return time.perf_counter() - start

    timed(2)  # warm-up
    one, full = timed(1), timed(args.decode_tokens + 1)
    config = model.config
    embedding = model.get_input_embeddings().weight
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * embedding.element_size()
    )
    bytes_per_token = decode_bytes_per_token(
        sum(p.numel() * p.element_size() for p in model.parameters()),  # a tied head is one parameter
        embedding.numel() * embedding.element_size(),
        bool(config.tie_word_embeddings),
        args.prompt_tokens + (args.decode_tokens + 1) / 2,
        kv_per_token,
    )
    return dict(system="transformers", quantization="none", tokens_per_s=args.decode_tokens / (full - one),
                bytes_per_token=bytes_per_token)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    folder = random_checkpoint(args.size, args.checkpoint_dir, getattr(torch, args.dtype))
    from fitllm.memory.offload.bandwidth import memory_bandwidth

    bandwidth = memory_bandwidth(device, nbytes=1 << 30)  # a device-to-device copy, read + write
    rows = []
    for quantization in args.quantizations.split(","):
        # graphs and async scheduling on (the default), each switched off in turn
        variants = [(False, "on"), (False, "off"), (True, "on")] if device.type == "cuda" else [(True, "off")]
        for eager, async_scheduling in variants:
            rows.append(fitllm_decode(folder, args, quantization, eager, async_scheduling))
    if not args.no_hf:
        rows.append(hf_decode(folder, args))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size} Llama, {args.dtype}, {name}, measured bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"prompt {args.prompt_tokens}, {args.decode_tokens} decode tokens at batch 1")  # fmt: skip
    print(
        f"{'system':14} {'quant':6} {'graphs':6} {'async':6} {'tok/s':>9} {'GB/token':>9} {'roofline':>9} "
        f"{'of roof':>8}"
    )
    for r in rows:
        r["roofline_tokens_per_s"] = bandwidth / r["bytes_per_token"]
        r["fraction_of_roofline"] = r["tokens_per_s"] / r["roofline_tokens_per_s"]
        graphs = "-" if "cuda_graphs" not in r else ("on" if r["cuda_graphs"] else "off")
        overlap = "-" if "async_scheduling" not in r else ("on" if r["async_scheduling"] else "off")
        print(f"{r['system']:14} {r['quantization']:6} {graphs:6} {overlap:6} {r['tokens_per_s']:9.1f} "
              f"{r['bytes_per_token'] / 1e9:9.3f} {r['roofline_tokens_per_s']:9.1f} "
              f"{r['fraction_of_roofline']:8.1%}")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    size=args.size,
                    dtype=args.dtype,
                    device=name,
                    date=time.strftime("%Y-%m-%d"),
                    bandwidth=bandwidth,
                    prompt_tokens=args.prompt_tokens,
                    decode_tokens=args.decode_tokens,
                    rows=rows,
                ),
                indent=2,
            )
        )
    return 0
