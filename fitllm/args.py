"""The flags every command and benchmark shares: engine (memory, batching, device), quantization, offload
and sampling, and their conversion into EngineConfig and SamplingParams."""

from __future__ import annotations

import argparse

from fitllm.config import EngineConfig
from fitllm.engine.request import SamplingParams
from fitllm.flags import add_flags, values_from_args


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags that shape the engine: one per EngineConfig field (its help, choices and parser live there)."""
    add_flags(p.add_argument_group("engine"), EngineConfig)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed engine flags."""
    return EngineConfig(**values_from_args(EngineConfig, args))


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
