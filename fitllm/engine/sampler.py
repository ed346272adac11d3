"""Batched sampling: penalties, biases, temperature, top-k / top-p / min-p, per-request random streams.

One call per step over the rows that sample. Rows that ask for nothing special cost nothing extra:
each transformation runs only on the rows that need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.engine.request import Logprob, Request


@dataclass(slots=True)
class SampleResult:
    """Sampled token per row, and (when asked) its logprob, rank and the top-n alternatives."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    sampled_logprob: list[float | None]


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] occurrence counts of each token id."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    for i, ids in enumerate(rows):
        if ids:
            t = torch.tensor(ids, dtype=torch.long, device=device)
            counts[i].index_add_(0, t, torch.ones(len(ids), device=device))
    return counts


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition (HF: prompt + output), presence and frequency (OpenAI: output only), in place."""
    rows = [
        i
        for i, r in enumerate(requests)
        if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
    ]
    if not rows:
        return
    vocab = logits.shape[-1]
    sub = logits[rows]
    out_counts = _token_counts([requests[i].output_token_ids for i in rows], vocab, logits.device)
    rep = torch.tensor([requests[i].params.repetition_penalty for i in rows], device=logits.device).unsqueeze(
        1
    )
    if (rep != 1.0).any():
        seen = _token_counts([requests[i].prompt_token_ids for i in rows], vocab, logits.device) > 0
        seen |= out_counts > 0
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([requests[i].params.frequency_penalty for i in rows], device=logits.device).unsqueeze(
        1
    )
    pres = torch.tensor([requests[i].params.presence_penalty for i in rows], device=logits.device).unsqueeze(
        1
    )
    sub = sub - freq * out_counts - pres * (out_counts > 0).float()
    logits[rows] = sub


def apply_bias_and_min_tokens(logits: torch.Tensor, requests: list[Request], eos_ids: list[int]) -> None:
    """logit_bias, and EOS / stop tokens forbidden until min_tokens have been generated."""
    for i, r in enumerate(requests):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, vals)
        if p.min_tokens and r.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[i, banned] = float("-inf")


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus to -inf (one sort for both)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = (vocab - top_k.clamp(1, vocab)).unsqueeze(1)
        threshold = sorted_logits.gather(1, kth)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Turns the logits of sampled rows into next tokens."""

    def __init__(self, eos_token_ids: list[int], seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        logits = logits.float()
        n = len(requests)
        want_logprobs = [r.params.logprobs for r in requests]
        raw_logprobs = logits.log_softmax(dim=-1) if any(k is not None for k in want_logprobs) else None

        apply_penalties(logits, requests)
        apply_bias_and_min_tokens(logits, requests, self.eos_token_ids)

        tokens = torch.empty(n, dtype=torch.long)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1).cpu()
        rand = [i for i, r in enumerate(requests) if not r.params.greedy]
        if rand:
            tokens[rand] = self._sample_random(logits[rand], [requests[i] for i in rand])

        token_list = tokens.tolist()
        lp_out: list[dict[int, Logprob] | None] = [None] * n
        sampled_lp: list[float | None] = [None] * n
        if raw_logprobs is not None:
            for i, k in enumerate(want_logprobs):
                if k is None:
                    continue
                row = raw_logprobs[i]
                tok = token_list[i]
                lp = row[tok].item()
                entry = {tok: Logprob(lp, int((row > lp).sum().item()) + 1)}
                if k:
                    vals, ids = row.topk(k)
                    for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
                        entry.setdefault(t, Logprob(v, rank))
                lp_out[i] = entry
                sampled_lp[i] = lp
        return SampleResult(token_list, lp_out, sampled_lp)

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = torch.tensor(
            [r.params.temperature for r in requests], dtype=logits.dtype, device=logits.device
        )
        logits = logits / temps.unsqueeze(1)
        ks = [r.params.top_k for r in requests]
        ps = [r.params.top_p for r in requests]
        top_k = (
            torch.tensor([k if k > 0 else logits.shape[-1] for k in ks], device=logits.device)
            if any(ks)
            else None
        )
        top_p = (
            torch.tensor(ps, dtype=logits.dtype, device=logits.device) if any(p < 1.0 for p in ps) else None
        )
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        min_ps = [r.params.min_p for r in requests]
        if any(min_ps):
            min_p = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        # Gumbel-max via exponential races: argmax(p / E) samples from p. Seeded rows draw from their own
        # stream, so their tokens do not depend on which other requests share the batch.
        noise = torch.empty_like(probs, device="cpu")
        noise.exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return (probs.cpu() / noise).argmax(dim=-1)
