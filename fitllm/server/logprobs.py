"""Logprobs in the shapes clients read: the completions API's lists and the chat API's `content` (both
dialects use them: KoboldCpp answers with both side by side).

`model` is the served model (fitllm/engine/view.py ServedModel), or anything with its `tokenizer`."""

from __future__ import annotations

from typing import Any, Protocol

from fitllm.engine.request import Logprob
from fitllm.loader.tokenizer import Tokenizer


class HasTokenizer(Protocol):
    tokenizer: Tokenizer


def _token_text(model: HasTokenizer, token_id: int, entry: Logprob | None = None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return model.tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_logprobs(
    model: HasTokenizer, token_ids: list[int], entries: list[dict[int, Logprob] | None], offset: int
) -> dict[str, Any]:
    """The completions API's logprobs object for `token_ids` (text offsets start at `offset`); a None entry
    (an echoed prompt's first token) has no logprob and no alternatives."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=False):
        own = None if entry is None else entry.get(tok)
        text = _token_text(model, tok, own)
        tokens.append(text)
        token_logprobs.append(None if own is None else own.logprob)
        if entry is None:
            top.append(None)
        else:  # the token's own logprob wins where an alternative decodes to the same text
            others = {_token_text(model, t, lp): lp.logprob for t, lp in entry.items() if t != tok}
            top.append(others if own is None else others | {text: own.logprob})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(model: HasTokenizer, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int):
    """The chat API's logprobs. `token` is the token decoded alone (U+FFFD where it holds part of a UTF-8
    character); `bytes` are the token's own bytes, from which a client can rebuild the text exactly."""
    token_bytes = model.tokenizer.token_bytes
    content = []
    for tok, entry in zip(token_ids, entries, strict=False):
        text = _token_text(model, tok, entry.get(tok))
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append(
            {
                "token": text,
                "logprob": entry[tok].logprob if tok in entry else None,
                "bytes": list(token_bytes(tok)),
                "top_logprobs": [
                    {"token": _token_text(model, i, lp), "logprob": lp.logprob, "bytes": list(token_bytes(i))}
                    for i, lp in ranked
                ],
            }
        )
    return {"content": content}
