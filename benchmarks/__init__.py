"""Benchmarks, run through `fitllm bench ...`; each prints a table and writes JSON."""
