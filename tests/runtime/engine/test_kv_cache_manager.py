"""KVCacheManager: block tables, all-or-nothing allocation, tail-first free, prefix hits."""

from __future__ import annotations

from brim.runtime.engine.kv_cache_manager import KVCacheManager, hash_block

from tests.runtime.engine.conftest import make_request

BLOCK_SIZE = 4


def test_allocate_slots_covers_computed_plus_new_tokens():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", 10)
    assert kv.allocate_slots(a, 6)  # chunk of 6 tokens: 2 blocks
    assert kv.block_table("a") == [0, 1]
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 2)  # 8 tokens still fit in 2 blocks
    assert kv.block_table("a") == [0, 1]
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 2)
    assert kv.block_table("a") == [0, 1, 2]
    b = make_request("b", 5)
    assert kv.allocate_slots(b, 5)
    assert kv.block_table("b") == [3, 4]
    assert kv.pool.num_free_blocks == 6


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", 12)
    assert kv.allocate_slots(a, 12)
    b = make_request("b", 8)
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free
    assert kv.block_table("b") == [] and "b" not in kv.req_blocks
    assert kv.pool.num_free_blocks == 1
    assert kv.allocate_slots(b, 4)  # a smaller chunk fits
    assert kv.block_table("b") == [3]


def test_free_returns_blocks_tail_first():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=False)
    a = make_request("a", 12)
    b = make_request("b", 4)
    kv.allocate_slots(a, 12)  # 0 1 2
    kv.allocate_slots(b, 4)  # 3
    kv.free(a)
    assert kv.block_table("a") == []
    assert list(kv.pool.free_queue) == [4, 5, 6, 7, 8, 9, 10, 2, 1, 0]
    kv.free(b)
    assert list(kv.pool.free_queue)[-1] == 3
    assert kv.pool.num_free_blocks == 11


def test_hash_chain_depends_on_parent_tokens_and_salt():
    root = hash_block(None, [1, 2, 3, 4], None)
    assert root == hash_block(None, [1, 2, 3, 4], None)
    assert root != hash_block(None, [1, 2, 3, 5], None)
    assert hash_block(root, [5, 6, 7, 8], None) != hash_block(None, [5, 6, 7, 8], None)
    assert root != hash_block(None, [1, 2, 3, 4], "tenant-a")
    assert hash_block(None, [1, 2, 3, 4], "tenant-a") != hash_block(None, [1, 2, 3, 4], "b")


def test_prefix_hit_shares_full_blocks_and_leaves_the_last_token_to_compute():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    a = make_request("a", prompt_token_ids=prompt)
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 10)
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.pool.num_cached_blocks == 2  # only full blocks are cached

    b = make_request("b", prompt_token_ids=prompt[:8] + [999, 998, 997])
    hits, num_cached = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_cached == 8
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_table("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]

    # An exact 8-token repeat may reuse only 1 block: the last token needs its logits.
    c = make_request("c", prompt_token_ids=prompt[:8])
    hits, num_cached = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and num_cached == 4


def test_prefix_hit_on_a_freed_block_counts_against_free_blocks():
    kv = KVCacheManager(3, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(100, 109))  # 9 tokens: 3 blocks
    a = make_request("a", prompt_token_ids=prompt)
    kv.allocate_slots(a, 9)
    kv.free(a)
    assert list(kv.pool.free_queue) == [2, 1, 0] and kv.pool.num_cached_blocks == 2

    b = make_request("b", prompt_token_ids=prompt)
    hits, num_cached = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_cached == 8
    # 2 hits taken out of the free queue leave 1 free block for the 9th token.
    assert kv.allocate_slots(b, 1, hits)
    assert kv.block_table("b") == [0, 1, 2]
    assert kv.pool.num_free_blocks == 0


def test_salt_isolates_prefix_cache():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(100, 109))
    kv.allocate_slots(make_request("a", prompt_token_ids=prompt, cache_salt="x"), 9)
    other = make_request("b", prompt_token_ids=prompt, cache_salt="y")
    assert kv.get_computed_blocks(other) == ([], 0)
    same = make_request("c", prompt_token_ids=prompt, cache_salt="x")
    assert kv.get_computed_blocks(same)[1] == 8


def test_evicted_block_is_no_longer_a_hit():
    kv = KVCacheManager(3, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(100, 109))
    a = make_request("a", prompt_token_ids=prompt)
    kv.allocate_slots(a, 9)
    kv.free(a)  # free queue: 2 1 0 (the tail evicted first)
    filler = make_request("f", 8)
    kv.allocate_slots(filler, 8)  # takes 2 and 1: block 1 held the second prompt block
    b = make_request("b", prompt_token_ids=prompt)
    hits, num_cached = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and num_cached == 4
