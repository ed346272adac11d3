"""Samplers beyond the fast path: the ordered chain (KoboldCpp's order), DRY, XTC, mirostat and friends."""
