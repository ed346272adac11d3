"""The KoboldAI / KoboldCpp-compatible API: request bodies and their translation (protocol.py), routes
(routes.py), genkey jobs and /api/extra/perf figures (jobs.py)."""
