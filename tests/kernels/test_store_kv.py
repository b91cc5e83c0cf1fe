"""store_kv: the Triton kernel against the torch reference, slot -1 skipped."""

import pytest
import torch

from brim.kernels import store_kv, store_kv_ref

SENTINEL = 1234.0  # cache contents before the write; a skipped slot must keep it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (8, 3, 80)])
def test_store_kv_matches_reference(seed, dtype, block_size, num_kv_heads, head_dim):
    num_blocks, num_tokens = 6, 20
    # Non-contiguous key/value: slices of a fused qkv projection, as a model produces them.
    qkv = torch.randn(num_tokens, 4 * num_kv_heads, head_dim, dtype=dtype)
    key = qkv[:, 2 * num_kv_heads:3 * num_kv_heads]
    value = qkv[:, 3 * num_kv_heads:]
    slot_mapping = torch.randperm(num_blocks * block_size)[:num_tokens].int()
    slot_mapping[::4] = -1  # padding

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, SENTINEL, dtype=dtype)
    v_cache = torch.full(shape, SENTINEL, dtype=dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_expected, v_expected, slot_mapping)

    store_kv(key, value, k_cache, v_cache, slot_mapping, backend="triton")

    assert torch.equal(k_cache, k_expected), f"seed {seed}"
    assert torch.equal(v_cache, v_expected), f"seed {seed}"
    num_written = int((slot_mapping >= 0).sum())
    assert int((k_cache != SENTINEL).any(-1).any(-1).sum()) == num_written


def test_store_kv_converts_to_cache_dtype(seed):
    key = torch.randn(5, 2, 64)
    value = torch.randn(5, 2, 64)
    k_cache = torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slot_mapping = torch.tensor([0, 17, -1, 31, 3], dtype=torch.int64)

    store_kv(key, value, k_cache, v_cache, slot_mapping, backend="triton")

    flat = k_cache.view(32, 2, 64)
    assert torch.equal(flat[17], key[1].to(torch.bfloat16)), f"seed {seed}"
    assert torch.equal(v_cache.view(32, 2, 64)[31], value[3].to(torch.bfloat16))
