"""Memory: accounting at this level (ledger, budget, host RSS, measured peaks, host-to-device transfers), the
paged KV cache in `kv/`, weight offload in `offload/`. Knows no model class, scheduler or HTTP."""
