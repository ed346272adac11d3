"""The llama.cpp side of `fitllm bench cpu`, run by the peer's own Python (the llama-cpp-python venv).

A separate process so that llama-cpp-python, its numpy and its threads never share fitllm's interpreter, and
so that its memory is its own. Standard library and `llama_cpp` only (it must not import fitllm). It reads one
JSON command a line on stdin and answers one JSON line on stdout:

  {"op": "generate", "prompt": [token ids], "max_tokens": N}
      -> {"prompt_tokens": P, "output_tokens": n, "ttft_s": ..., "total_s": ...}

Each generation starts from an empty KV cache (`Llama.reset()`: no prefix reuse from the previous call, so a
prefill is a whole prefill), is greedy and never ends at EOS (its logit is pushed to -inf), through the
high-level API (`create_completion`, streamed, so the first token's time is seen).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import llama_cpp

    model_path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=n_ctx,
        verbose=False,
    )
    no_eos = {llm.token_eos(): -float("inf")}
    print(json.dumps({"ready": True, "llama_cpp": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") != "generate":
            print(json.dumps({"error": f"unknown op {cmd.get('op')!r}"}), flush=True)
            continue
        llm.reset()
        first = None
        start = time.perf_counter()
        for _ in llm.create_completion(
            cmd["prompt"],
            max_tokens=cmd["max_tokens"],
            temperature=0.0,
            logit_bias=no_eos,
            stream=True,
        ):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        # Tokens made: the last sampled token is never evaluated, so the context holds prompt + n - 1 (a
        # stream chunk is not always a token: an incomplete UTF-8 character is held back).
        n = llm.n_tokens - len(cmd["prompt"]) + 1
        print(
            json.dumps(
                {
                    "prompt_tokens": len(cmd["prompt"]),
                    "output_tokens": n,
                    "ttft_s": (first or end) - start,
                    "total_s": end - start,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
