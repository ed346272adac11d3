"""The paged KV cache: block pool, block tables and prefix hashes (manager), slab storage (the one owner of
slab liveness and of the `kv` / `kv_cached` ledger tags), KV dtypes and bytes per token (format), how the
kernels address slabs (layout), swap to host memory, and sizing the pool at start (setup)."""
