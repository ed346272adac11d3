"""The OpenAI-compatible API: request bodies (protocol.py) and routes (routes.py)."""
