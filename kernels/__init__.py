"""Attention over the paged KV cache, and KV writes into it.

`paged_attention` and `store_kv` are the public entry points; see `reference.py` for
the contract. The torch reference runs on CPU.
"""

from brim.kernels.reference import paged_attention_ref, store_kv_ref


def paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *,
                    sliding_window=None, backend=None):
    return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                               scale, sliding_window=sliding_window)


def store_kv(key, value, k_cache, v_cache, slot_mapping):
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


__all__ = ["paged_attention", "store_kv", "paged_attention_ref", "store_kv_ref"]
