"""Tensor parallelism: rank 0's engine drives worker processes that run the model runner each step."""
