"""FIM prompts for the server's routes (/infill, and /v1/completions with a `suffix`): the served model's
FIM tokens or a 400 naming the model, the prompt built off the event loop, and the stop tokens of a middle.
"""

from __future__ import annotations

import dataclasses

from fitllm.engine.request import SamplingParams
from fitllm.loader.fim import ExtraFile, FimTokens, build_fim_prompt, find_fim_tokens, missing_fim_message
from fitllm.server.errors import bad_request
from fitllm.server.state import ServerState


def model_fim(st: ServerState, param: str) -> FimTokens:
    """The served model's FIM tokens, or the 400 naming the model."""
    fim = find_fim_tokens(st.tokenizer)
    if fim is None:
        raise bad_request(missing_fim_message(st.model_name), param)
    return fim


async def fim_prompt(
    st: ServerState,
    prefix: str,
    suffix: str,
    prompt: str = "",
    extra: tuple[ExtraFile, ...] = (),
    param: str = "suffix",
) -> list[int]:
    """One FIM prompt's token ids (its text checked against the prompt limit, tokenized off the loop)."""
    fim = model_fim(st, param)
    chars = len(prefix) + len(suffix) + len(prompt) + sum(len(f.text) + len(f.filename) for f in extra)
    st.check_prompt_chars(chars, param)
    return await st.heavy.run(build_fim_prompt, st.tokenizer, fim, prefix, suffix, prompt, extra, size=chars)


def fim_params(st: ServerState, params: SamplingParams, param: str = "suffix") -> SamplingParams:
    """`params` that also stop at the tokens ending a middle (FimTokens.stop_ids), as llama.cpp does."""
    fim = model_fim(st, param)
    stops = sorted(set(params.stop_token_ids) | set(fim.stop_ids))
    return dataclasses.replace(params, stop_token_ids=stops)
