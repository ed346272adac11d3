"""`fitllm bench infill`: an editor's keystrokes through llama.cpp's `/infill` route, with and without the
prefix cache.

An editor resends the whole file around the cursor on every keystroke: the prefix grows by a character, the
suffix stays. The file is one of this repository's own sources, cut at a line in its middle (prefix before,
suffix after). One cold request, then `--keystrokes` requests each one character longer, against a server
with prefix caching and one without, alternating per keystroke (same process, same model). Per request:
prompt tokens, tokens served from the cache (`timings.cache_n`), tokens prefilled, and the wall time.
Summary: keystroke time / cold time with the cache, and keystroke time cached / uncached.

Default model: a random-weight code model with a byte-level vocabulary, built in --cache-dir: `--format psm`
a Qwen2 layout with Qwen2.5-Coder's FIM and repo tokens (the suffix follows the cursor, so every keystroke
prefills it again), `--format codegeex` a GLM with CodeGeeX4's tokens (suffix first, so a keystroke prefills
little more than what was typed); `--model` takes any model with FIM tokens (CodeGeeX4, Qwen2.5-Coder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.measure import machine_facts
from benchmarks.random_weights import write_byte_tokenizer

SOURCE = Path(__file__).resolve().parent.parent / "fitllm" / "engine" / "scheduler.py"
CODER_SPECIAL = {  # the random model's vocabulary tail per FIM format
    "psm": ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
            "<|file_sep|>"],  # Qwen2.5-Coder's
    "codegeex": ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>",
                 "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"],  # CodeGeeX4's (GLM-4's)
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a model with FIM tokens (default: a random coder of --format)")
    p.add_argument(
        "--format",
        choices=sorted(CODER_SPECIAL),
        default="psm",
        help="the random coder: psm (Qwen2-layout, Qwen2.5-Coder's tokens: suffix after the cursor's prefix) or "
        "codegeex (GLM, CodeGeeX4's tokens: suffix first)",
    )
    p.add_argument("--cache-dir", default="/tmp/fitllm-bench-infill", help="where the random model is built")
    p.add_argument("--prefix-chars", type=int, default=3000, help="characters of the file before the cursor")
    p.add_argument("--suffix-chars", type=int, default=1000, help="characters of the file after the cursor")
    p.add_argument("--keystrokes", type=int, default=6, help="requests after the cold one")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens each request generates")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="bench-infill.json", help="JSON results")


def coder_checkpoint(folder: Path, fmt: str) -> Path:
    """A random coder (8 layers of 512) with a byte-level vocabulary and `fmt`'s FIM tokens: Qwen2 layout for
    psm, GLM (CodeGeeX4's architecture) for codegeex; reused when built."""
    import torch
    import transformers

    if (folder / "tokenizer.json").exists():
        return folder
    special = CODER_SPECIAL[fmt]
    sizes = dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=256 + len(special), max_position_embeddings=8192, bos_token_id=256, eos_token_id=256,
        pad_token_id=256, tie_word_embeddings=False,
    )  # fmt: skip
    if fmt == "psm":
        config, model_class, head = transformers.Qwen2Config(**sizes), transformers.Qwen2ForCausalLM, []
    else:
        config = transformers.GlmConfig(**sizes, head_dim=64)
        model_class, head = transformers.GlmForCausalLM, ["[gMASK]", "<sop>"]
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    model_class(config).save_pretrained(folder)
    write_byte_tokenizer(folder, special, eos="<|endoftext|>", prefix_tokens=head)
    return folder


@contextlib.contextmanager
def served(model: str, dtype: str, prefix_caching: bool) -> Iterator[str]:
    """`fitllm serve`'s app on a loopback port in this process (uvicorn in a thread); yields its URL."""
    from fitllm.config import EngineConfig
    from fitllm.engine.async_engine import AsyncEngine
    from fitllm.server.app import build_app
    from fitllm.server.shutdown import draining_server

    config = EngineConfig(model=model, dtype=dtype, max_model_len=8192, enable_prefix_caching=prefix_caching)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = draining_server(build_app(AsyncEngine(config), "coder"), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def cursor(prefix_chars: int, suffix_chars: int) -> tuple[str, str, str]:
    """This repository's scheduler source cut at the line nearest its middle: (prefix, suffix, the next
    characters typed, taken from the text after the cursor)."""
    text = SOURCE.read_text()
    cut = text.index("\n", len(text) // 2) + 1
    return text[max(0, cut - prefix_chars) : cut], text[cut : cut + suffix_chars], text[cut : cut + 64]


def infill(url: str, prefix: str, suffix: str, max_tokens: int) -> dict:
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_tokens, "temperature": 0}
    body["input_extra"] = [{"filename": "fitllm/engine/request.py", "text": "class Request: ...\n"}]
    start = time.perf_counter()
    r = httpx.post(f"{url}/infill", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    t = out["timings"]
    return {
        "prompt_tokens": out["tokens_evaluated"],
        "cached": t["cache_n"],
        "prefilled": t["prompt_n"],
        "generated": out["tokens_predicted"],
        "wall_s": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> int:
    model = args.model or str(coder_checkpoint(Path(args.cache_dir) / f"coder-{args.format}", args.format))
    prefix, suffix, typed = cursor(args.prefix_chars, args.suffix_chars)
    rows: dict[str, list[dict]] = {"cached": [], "uncached": []}
    with served(model, args.dtype, True) as on, served(model, args.dtype, False) as off:
        for name, url in (("cached", on), ("uncached", off)):
            infill(url, "# warm-up\n", "", 1)  # first-request costs (allocations) out of the cold row
            rows[name].append(infill(url, prefix, suffix, args.max_tokens) | {"keystroke": 0})
        for k in range(1, args.keystrokes + 1):
            for name, url in (
                (("cached", on), ("uncached", off)) if k % 2 else (("uncached", off), ("cached", on))
            ):
                rows[name].append(infill(url, prefix + typed[:k], suffix, args.max_tokens) | {"keystroke": k})
    print(f"{'server':9} {'key':>3} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'gen':>4} {'wall s':>8}")
    for name, rs in rows.items():
        for r in rs:
            print(
                f"{name:9} {r['keystroke']:>3} {r['prompt_tokens']:>7} {r['cached']:>7} {r['prefilled']:>9} "
                f"{r['generated']:>4} {r['wall_s']:>8.3f}"
            )
    key_on = statistics.median(r["wall_s"] for r in rows["cached"][1:])
    key_off = statistics.median(r["wall_s"] for r in rows["uncached"][1:])
    summary = {
        "keystroke_over_cold_cached": key_on / rows["cached"][0]["wall_s"],
        "keystroke_cached_over_uncached": key_on / key_off,
        "median_keystroke_cached": statistics.median(r["cached"] for r in rows["cached"][1:]),
        "median_keystroke_prefilled": statistics.median(r["prefilled"] for r in rows["cached"][1:]),
    }
    print(
        f"keystroke / cold (cache on): x{summary['keystroke_over_cold_cached']:.3f}; keystroke cache on / off: "
        f"x{summary['keystroke_cached_over_uncached']:.3f}; a keystroke reuses "
        f"{summary['median_keystroke_cached']:.0f} tokens and prefills {summary['median_keystroke_prefilled']:.0f}"
    )
    result = {
        "machine": machine_facts(),
        "args": vars(args) | {"model": model},
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0
