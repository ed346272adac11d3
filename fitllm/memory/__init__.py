"""Memory: the ledger and budget, the planner, the paged KV pool and its manager, KV swap, and weight offload."""
