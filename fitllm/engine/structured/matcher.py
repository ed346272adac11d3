"""One request's grammar state, advanced with each accepted output token.

It follows the request's output tokens exactly (`num_accepted` == output tokens seen): preemption keeps the
output tokens (both swap and recompute only rebuild K/V), so the matcher carries over unchanged; a rewind
(banned strings, fitllm/engine/banned.py; later speculative decoding's rejected drafts) rolls it back with
`rollback_to`. llguidance's rollback has no depth limit; where it fails anyway, the matcher is rebuilt from
the compiled one and the kept tokens replayed.

For speculation (not built yet): `LLMatcher.validate_tokens(draft)` says how many draft tokens the grammar
accepts from the current state without moving it; the verify step needs one mask per draft position, which
`llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens` computes in one call (consume, fill, roll
back per position); after verification, `accept` the kept tokens (or `consume_tokens`) and nothing else
moves, so rejected drafts need no rollback at all. xgrammar's equivalent is accept_token + rollback(n).
"""

from __future__ import annotations

from typing import Any

from fitllm.engine.structured.spec import StructuredOutput


class ConstraintError(RuntimeError):
    """The request's output left its grammar (a token the mask forbade was taken): the request fails."""


class Constraint:
    """A request's llguidance matcher and how many of its output tokens it has consumed."""

    __slots__ = ("spec", "matcher", "_pristine", "num_accepted", "error")

    def __init__(self, spec: StructuredOutput, matcher: Any) -> None:
        self.spec = spec
        self.matcher = matcher
        self._pristine = matcher.deep_copy()  # for a rebuild when a rollback cannot be made
        self.num_accepted = 0
        self.error: ConstraintError | None = None  # set when a token left the grammar

    def accept(self, token: int) -> None:
        """Advance by one sampled token (EOS included: it ends the grammar). A token the grammar refuses
        sets `error` (the engine fails the request; this runs where one request's error must not raise)."""
        self.num_accepted += 1
        if not self.matcher.consume_token(token) and self.error is None:
            self.error = ConstraintError(
                f"token {token} does not continue the {self.spec.kind} of {self.spec.field}: "
                f"{self.matcher.get_error()}"
            )

    @property
    def finished(self) -> bool:
        """The grammar is complete and took its end (EOS): the request stops here."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def rollback_to(self, output_tokens: list[int]) -> None:
        """Back to the state after `output_tokens` (a prefix of what it consumed)."""
        drop = self.num_accepted - len(output_tokens)
        if drop <= 0:
            return
        if not self.matcher.is_error() and self.matcher.rollback(drop):
            self.num_accepted = len(output_tokens)
            return
        self.matcher = self._pristine.deep_copy()
        self.num_accepted = 0
        self.error = None
        for t in output_tokens:
            self.accept(t)
