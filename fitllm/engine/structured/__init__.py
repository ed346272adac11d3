"""Structured output: a request's output constrained by a JSON schema, regex, choice list or grammar
(llguidance; see docs/architecture.md)."""
