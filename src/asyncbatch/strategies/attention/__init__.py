"""Attention backends over the paged KV cache. `sdpa` is the reference that runs anywhere."""
