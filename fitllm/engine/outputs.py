"""The RequestOutput handed back for a request after a step (the stop checks are the scheduler's)."""

from __future__ import annotations

from fitllm.engine.request import CompletionOutput, Request, RequestOutput


def make_output(req: Request) -> RequestOutput:
    """The request's cumulative text and token ids, plus what is new since its last output."""
    finished = req.status.finished
    delta_text = req.detokenizer.take_delta(finished)
    # With banned strings, only tokens whose text is out are reported: the others may still be rewound.
    released = req.detokenizer.released_tokens(finished)
    logprobs = None if req.logprobs is None else req.logprobs[:released]
    completion = CompletionOutput(
        index=0,
        text=req.detokenizer.streamed_text,
        token_ids=req.output_token_ids[:released],
        cumulative_logprob=_cumulative(req, logprobs) if logprobs is not None else None,
        # A copy: the request's list keeps growing while a front end reads this output on another thread.
        logprobs=logprobs,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        delta_text=delta_text,
        delta_token_ids=req.take_new_token_ids(released),
    )
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        outputs=[completion],
        finished=finished,
        reuse=req.reuse,
        metrics=req.metrics,
    )


def _cumulative(req: Request, logprobs: list) -> float:
    """The sampled tokens' summed logprob over the reported ones (the request's own sum when all are)."""
    if len(logprobs) == len(req.logprobs):
        return req.cumulative_logprob
    return sum(entry[tok].logprob for entry, tok in zip(logprobs, req.output_token_ids, strict=False))


def error_output(req: Request, error: BaseException) -> RequestOutput:
    """The last output of a request that failed (`error`); its text state may be what broke, so a
    detokenizer that raises again leaves the text empty rather than hiding the first error."""
    try:
        out = make_output(req)
    except Exception:
        completion = CompletionOutput(0, "", req.output_token_ids, None, None, req.finish_reason)
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], True)
    out.error = error
    return out
