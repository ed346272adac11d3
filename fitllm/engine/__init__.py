"""The engine: requests, scheduling, model execution, sampling and detokenization."""
