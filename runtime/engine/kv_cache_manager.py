"""Which physical blocks each request's tokens live in.

A request's block table covers its tokens in order: token t lives in block
block_table[t // block_size] at offset t % block_size (the layout the kernels share,
docs/engine.md).

    |<------------- num_tokens ---------------->|
    | computed (KV cached) | new this step | rest|
    |<-- prefix hit -->|                          (prefix caching: full blocks only)
"""

from __future__ import annotations

import hashlib
import struct

from brim.runtime.engine.block_pool import BlockPool, KVCacheBlock
from brim.runtime.engine.request import Request


def hash_block(parent: bytes | None, token_ids: list[int], salt: str | None) -> bytes:
    """Identity of a full block: chained over the previous block's hash and its tokens.

    The chain makes a block's identity depend on the whole prefix, so two requests share
    a block only when everything before it matches too. The salt isolates tenants.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if salt is not None:
        h.update(b"salt:" + salt.encode())
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same tables, as block ids
        # Prefix-cache accounting, in tokens.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    def block_table(self, req_id: str) -> list[int]:
        """The request's block ids in order (a copy: the table changes as it grows)."""
        return list(self.req_block_ids.get(req_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest chain of cached full blocks that starts the request's tokens.

        At most num_tokens - 1 tokens come from the cache: the last one must be computed
        to produce logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, upto=max_blocks * self.block_size)
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Counted once per admission, not per attempt, so retries don't inflate the rate."""
        self.num_queried_tokens += num_queried
        self.num_hit_tokens += num_hit

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] = (),
    ) -> bool:
        """Give the request blocks for its computed tokens plus num_new_tokens more.

        computed_blocks are prefix-cache hits (from get_computed_blocks) that start a
        waiting request's block table. Returns False, changing nothing, when the pool
        cannot supply the blocks.
        """
        block_size = self.block_size
        blocks = self.req_blocks.get(request.req_id, ())
        num_computed = request.num_computed_tokens + len(computed_blocks) * block_size
        num_total = num_computed + num_new_tokens
        num_needed = -(-num_total // block_size) - len(blocks) - len(computed_blocks)
        if computed_blocks:
            # Cached hits with no other user sit in the free queue: taking them shrinks it.
            num_free_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
            if num_needed > self.pool.num_free_blocks - num_free_hits:
                return False
        elif num_needed > self.pool.num_free_blocks:
            return False
        if not blocks:  # its first blocks: the table starts here, as a refusal changes nothing
            blocks = self.req_blocks[request.req_id] = []
            self.req_block_ids[request.req_id] = []
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            self.req_block_ids[request.req_id].extend(b.block_id for b in computed_blocks)
        if num_needed > 0:
            new_blocks = self.pool.allocate(num_needed)
            blocks.extend(new_blocks)
            self.req_block_ids[request.req_id].extend(b.block_id for b in new_blocks)
        if self.enable_prefix_caching:
            # Blocks filled by this step can be shared from the next scheduling on: within
            # one forward every layer stores the new KV before attention reads it. Only
            # blocks of real tokens: speculative guesses past the last one may be rejected.
            # Blocks before the first one this step writes were cached when they filled.
            upto = min(num_total, len(request.all_token_ids))
            num_full = upto // block_size
            first = num_computed // block_size
            if first < num_full:
                hashes = self._block_hashes(request, upto=upto)
                for i in range(first, num_full):
                    self.pool.cache(blocks[i], hashes[i])
        return True

    def uncache(self, block_ids: list[int]) -> None:
        """These blocks' contents are not what their hashes say (a failed step was to fill
        them): keep the prefix cache from handing them out."""
        for block_id in block_ids:
            self.pool.uncache(self.pool.blocks[block_id])

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past its first num_tokens tokens (the slots of
        rejected speculative guesses; never cached, as they held no real tokens)."""
        blocks = self.req_blocks.get(request.req_id)
        keep = -(-num_tokens // self.block_size)
        if blocks and len(blocks) > keep:
            extra = blocks[keep:]
            del blocks[keep:]
            del self.req_block_ids[request.req_id][keep:]
            for block in extra:
                self.pool.uncache(block)
            self.pool.free(reversed(extra))

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.req_id, [])
        self.req_block_ids.pop(request.req_id, None)
        self.pool.free(reversed(blocks))

    def _block_hashes(self, request: Request, upto: int | None = None) -> list[bytes]:
        """Hashes of the request's full blocks, at least those among its first `upto`
        tokens (memoized: the request's own list, which may hold more)."""
        hashes = request.block_hashes
        num_full = (request.num_tokens if upto is None else upto) // self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hash_block(hashes[-1] if hashes else None, chunk, request.cache_salt))
        return hashes
