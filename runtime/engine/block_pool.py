"""The pool of physical KV-cache blocks: a free list with reference counts.

A block with ref_cnt 0 sits in the free queue. With prefix caching a freed block keeps
its contents and hash; it is evicted (its hash forgotten) only when handed out again,
least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict


class KVCacheBlock:
    """One physical block: block_size tokens of K and V in every layer.

    ref_cnt: requests whose block table holds it.
    block_hash: identity of its contents when it is full and cached, else None.
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt})"


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, in eviction order: the front is handed out first.
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[bytes, KVCacheBlock] = {}  # block_hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[KVCacheBlock]:
        """Hand out num_blocks free blocks (ref_cnt 1), evicting cached contents."""
        if num_blocks > len(self.free_queue):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free(self, blocks) -> None:
        """Drop one reference from each block; those at zero join the free queue's back.

        Callers pass a request's blocks tail first, so that its last blocks (the least
        likely to be shared) are evicted before its prefix.
        """
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
            elif block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than allocated")

    def touch(self, blocks) -> None:
        """Take a reference on cached blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def cache(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """Record a full block's contents; the first block with a given hash stays canonical."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)

    def lookup(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def uncache(self, block: KVCacheBlock) -> None:
        """Forget what the block holds: the prefix cache never hands it out again."""
        self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)
