"""Memory: the KV block pool and its manager (the ledger and planner join in the memory issue)."""
