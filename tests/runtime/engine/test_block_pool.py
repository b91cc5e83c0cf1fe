"""BlockPool on CPU with 11 blocks: exact ids, free order, ref counts, prefix-cache eviction."""

from __future__ import annotations

import pytest

from brim.runtime.engine.block_pool import BlockPool


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def free_queue(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def test_fresh_pool_hands_out_blocks_in_id_order():
    pool = BlockPool(11)
    assert pool.num_free_blocks == 11 and pool.num_used_blocks == 0 and pool.usage == 0.0
    first = pool.allocate(3)
    second = pool.allocate(2)
    assert ids(first) == [0, 1, 2]
    assert ids(second) == [3, 4]
    assert [b.ref_cnt for b in first + second] == [1] * 5
    assert pool.num_free_blocks == 6 and pool.num_used_blocks == 5
    assert pool.usage == pytest.approx(5 / 11)
    assert free_queue(pool) == [5, 6, 7, 8, 9, 10]


def test_freed_blocks_rejoin_the_back_of_the_queue_in_the_order_given():
    pool = BlockPool(11)
    blocks = pool.allocate(4)  # 0 1 2 3
    pool.free(reversed(blocks))  # a request frees tail first
    assert free_queue(pool) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1, 0]
    # The never-used blocks go first, then the freed tail before the freed head.
    assert ids(pool.allocate(8)) == [4, 5, 6, 7, 8, 9, 10, 3]
    assert free_queue(pool) == [2, 1, 0]


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(11)
    pool.allocate(9)
    assert pool.num_free_blocks == 2
    with pytest.raises(RuntimeError, match="asked for 3 blocks, 2 free"):
        pool.allocate(3)
    assert free_queue(pool) == [9, 10]


def test_shared_block_is_free_only_after_its_last_reference():
    pool = BlockPool(11)
    (block,) = pool.allocate(1)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and 0 not in pool.free_queue
    pool.free([block])
    assert block.ref_cnt == 0 and free_queue(pool)[-1] == 0
    with pytest.raises(RuntimeError, match="block 0 freed more often than allocated"):
        pool.free([block])


def test_freed_cached_block_keeps_its_hash_until_handed_out_again():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"A")
    pool.cache(b, b"B")
    pool.free([b, a])
    assert pool.num_cached_blocks == 2
    assert pool.lookup(b"A") is a and pool.lookup(b"B") is b

    # A prefix hit on a free cached block pulls it out of the free queue.
    pool.touch([a])
    assert a.ref_cnt == 1 and free_queue(pool) == [1]

    # Handing b out again evicts its contents.
    (again,) = pool.allocate(1)
    assert again is b
    assert b.block_hash is None and pool.lookup(b"B") is None
    assert pool.lookup(b"A") is a and pool.num_cached_blocks == 1


def test_first_block_with_a_hash_stays_canonical():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, b"X")
    pool.cache(b, b"X")  # same contents computed twice
    assert pool.lookup(b"X") is a
    pool.cache(a, b"Y")  # a full block's hash never changes
    assert a.block_hash == b"X" and pool.lookup(b"Y") is None
    # Evicting the duplicate leaves the canonical entry alone.
    pool.free([b])
    pool.allocate(3)  # 2, 3, then b
    assert b.block_hash is None and pool.lookup(b"X") is a


def test_reset_prefix_cache_forgets_only_free_blocks():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, b"A")
    pool.cache(b, b"B")
    pool.free([b])
    pool.reset_prefix_cache()
    assert pool.lookup(b"B") is None and b.block_hash is None
    assert pool.lookup(b"A") is a  # still in use: its hash stays
