"""Automatic prefix caching (issue 6): exact block ids, reference counts, eviction order,
preemption and abort of sharers, the hit counter, and greedy parity on the real model.

Complements test_kv_cache_manager.py (hash chain, first hit, exact 2-block repeat, salt,
eviction of a hit) and test_block_pool.py (pool-level ref counts and eviction).
"""

from __future__ import annotations

import pytest

from brim.runtime.engine.kv_cache_manager import KVCacheManager

from tests.runtime.engine.conftest import (
    assert_all_blocks_free,
    make_request,
    make_scheduler,
    run_step,
    scheduled,
)

BLOCK_SIZE = 4
PREFIX = list(range(500, 508))  # two full blocks of 4


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def ref_cnts(kv: KVCacheManager, n: int) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks[:n]]


# -- KVCacheManager -------------------------------------------------------------------


def test_partial_last_block_is_not_shared_until_it_fills():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", prompt_token_ids=PREFIX + [1, 2])  # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10)
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.pool.blocks[2].block_hash is None and kv.pool.num_cached_blocks == 2

    # The same 10 tokens again: the 2 full blocks are hits, the partial one is not.
    b = make_request("b", prompt_token_ids=PREFIX + [1, 2])
    hits, num_cached = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1] and num_cached == 8
    assert kv.allocate_slots(b, 2, hits)
    assert kv.block_table("b") == [0, 1, 3]
    assert ref_cnts(kv, 4) == [2, 2, 1, 1]

    # a decodes 2 tokens: its third block fills up and becomes shareable.
    a.num_computed_tokens = 10
    a.append_token(3)
    a.append_token(4)
    assert kv.allocate_slots(a, 2)
    assert kv.pool.blocks[2].block_hash is not None and kv.pool.num_cached_blocks == 3
    c = make_request("c", prompt_token_ids=PREFIX + [1, 2, 3, 4, 9])
    hits, num_cached = kv.get_computed_blocks(c)
    assert ids(hits) == [0, 1, 2] and num_cached == 12
    # A request that diverges inside the third block shares only the first two.
    d = make_request("d", prompt_token_ids=PREFIX + [1, 2, 3, 5, 9])
    assert ids(kv.get_computed_blocks(d)[0]) == [0, 1]


def test_eviction_is_least_recently_freed_first_and_a_hit_refreshes_a_prefix():
    kv = KVCacheManager(6, BLOCK_SIZE, enable_prefix_caching=True)
    prompt_a = PREFIX + [1]
    prompt_b = list(range(600, 608)) + [1]
    a = make_request("a", prompt_token_ids=prompt_a)
    b = make_request("b", prompt_token_ids=prompt_b)
    assert kv.allocate_slots(a, 9) and kv.allocate_slots(b, 9)
    assert kv.block_table("a") == [0, 1, 2] and kv.block_table("b") == [3, 4, 5]
    kv.free(a)
    kv.free(b)
    assert list(kv.pool.free_queue) == [2, 1, 0, 5, 4, 3]  # a's prefix is the oldest

    # a's prompt comes back: a hit on 0 and 1; its new block is the queue's front (2).
    a2 = make_request("a2", prompt_token_ids=prompt_a)
    hits, _ = kv.get_computed_blocks(a2)
    assert ids(hits) == [0, 1]
    assert kv.allocate_slots(a2, 1, hits)
    assert kv.block_table("a2") == [0, 1, 2]
    kv.free(a2)
    assert list(kv.pool.free_queue) == [5, 4, 3, 2, 1, 0]  # now b's prefix is the oldest

    # Pressure for 2 blocks evicts 5 (no hash) and 4 (b's second block), not a's prefix.
    filler = make_request("filler", 8)
    assert kv.allocate_slots(filler, 8)
    assert kv.block_table("filler") == [5, 4]
    assert ids(kv.get_computed_blocks(make_request("a3", prompt_token_ids=prompt_a))[0]) == [0, 1]
    assert ids(kv.get_computed_blocks(make_request("b2", prompt_token_ids=prompt_b))[0]) == [3]
    assert kv.pool.num_cached_blocks == 5  # a's 2, b's first, the filler's 2


def test_reference_counts_under_three_concurrent_sharers():
    kv = KVCacheManager(11, BLOCK_SIZE, enable_prefix_caching=True)
    reqs = []
    for i, name in enumerate("abc"):
        r = make_request(name, prompt_token_ids=PREFIX + [i])
        hits, num_cached = kv.get_computed_blocks(r)
        assert num_cached == (0 if i == 0 else 8)
        assert kv.allocate_slots(r, 9 - num_cached, hits)
        reqs.append(r)
    assert [kv.block_table(n) for n in "abc"] == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert ref_cnts(kv, 5) == [3, 3, 1, 1, 1]
    assert kv.pool.num_free_blocks == 6

    kv.free(reqs[1])  # b: only its own block returns to the pool
    assert ref_cnts(kv, 5) == [2, 2, 1, 0, 1]
    assert list(kv.pool.free_queue)[-1] == 3
    kv.free(reqs[0])  # a: the shared prefix is still c's
    assert ref_cnts(kv, 5) == [1, 1, 0, 0, 1]
    assert list(kv.pool.free_queue)[-2:] == [3, 2]
    assert kv.block_table("c") == [0, 1, 4]
    kv.free(reqs[2])  # the last sharer: the prefix joins the queue's back, still cached
    assert ref_cnts(kv, 5) == [0, 0, 0, 0, 0]
    assert list(kv.pool.free_queue)[-5:] == [3, 2, 4, 1, 0]
    assert kv.pool.num_free_blocks == 11 and kv.pool.num_cached_blocks == 2


# -- Scheduler ------------------------------------------------------------------------


def test_fully_cached_prompt_recomputes_its_last_block():
    """A prompt of exactly k full blocks, sent again, hits k-1 blocks: at most num_tokens-1
    tokens can come from the cache (the last one's logits are needed), and only whole
    blocks are shared, so the whole last block is recomputed into a new block."""
    s = make_scheduler(11, enable_prefix_caching=True)
    kv = s.kv_cache
    s.add(make_request("a", prompt_token_ids=PREFIX, max_tokens=1))
    assert scheduled(run_step(s)) == [("a", 8)]
    assert list(kv.pool.free_queue)[-2:] == [1, 0] and kv.pool.num_cached_blocks == 2

    b = make_request("b", prompt_token_ids=PREFIX, max_tokens=1)
    s.add(b)
    out = s.schedule()
    assert [(x.request.req_id, x.num_new_tokens, x.start) for x in out.scheduled] == [("b", 4, 4)]
    assert kv.block_table("b") == [0, 2]  # block 1 stays free (and cached); 2 is new
    assert b.num_cached_tokens == 4
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (16, 4)
    assert kv.pool.num_cached_blocks == 2  # the recomputed copy does not replace block 1
    assert kv.pool.blocks[1].ref_cnt == 0 and 1 in kv.pool.free_queue


def test_preempting_and_aborting_a_sharer_leaves_the_shared_prefix_to_the_other():
    s = make_scheduler(5, enable_prefix_caching=True)
    kv = s.kv_cache
    a = make_request("a", prompt_token_ids=PREFIX + [1], max_tokens=40)
    b = make_request("b", prompt_token_ids=PREFIX + [2], max_tokens=8)
    s.add(a)
    s.add(b)
    # a's full blocks are cached as they are allocated, so b hits them in the same step.
    assert scheduled(run_step(s)) == [("a", 9), ("b", 1)]
    assert kv.block_table("a") == [0, 1, 2] and kv.block_table("b") == [0, 1, 3]
    assert ref_cnts(kv, 5) == [2, 2, 1, 1, 0]
    for _ in range(3):  # both decode to 12 tokens, filling their third blocks
        assert scheduled(run_step(s)) == [("a", 1), ("b", 1)]
    assert a.num_tokens == b.num_tokens == 13

    # a grows into the last free block; b, the newest, cannot grow and preempts itself.
    out = run_step(s)
    assert scheduled(out) == [("a", 1)] and out.preempted == ["b"]
    assert kv.block_table("a") == [0, 1, 2, 4] and kv.block_table("b") == []
    assert ref_cnts(kv, 5) == [1, 1, 1, 0, 1]  # the shared prefix is still a's
    assert list(kv.pool.free_queue) == [3]
    assert b.num_computed_tokens == 0 and s.num_preemptions == 1

    # b cannot come back yet: its 3 hits (0, 1 and its own cached block 3, at most
    # (13-1)//4 = 3 blocks) would use the only free block, leaving none for its last token.
    assert scheduled(run_step(s)) == [("a", 1)]
    assert list(s.waiting) == [b] and kv.pool.blocks[3].block_hash is not None

    # Abort a: every block is free again, and the prefix stays cached.
    s.finish(a, "abort")
    assert kv.block_table("a") == [] and list(kv.pool.free_queue) == [3, 4, 2, 1, 0]
    out = run_step(s)
    assert [(x.request.req_id, x.num_new_tokens, x.start) for x in out.scheduled] == [
        ("b", 1, 12)]  # only the last token is recomputed
    assert kv.block_table("b") == [0, 1, 3, 4]
    assert b.num_preemptions == 1

    # c shares the prefix with the running b; aborting c leaves it to b.
    c = make_request("c", prompt_token_ids=PREFIX + [3], max_tokens=8)
    s.add(c)
    assert scheduled(run_step(s)) == [("b", 1), ("c", 1)]
    assert kv.block_table("c") == [0, 1, 2]
    assert ref_cnts(kv, 5) == [2, 2, 1, 1, 1]
    s.finish(c, "abort")
    assert ref_cnts(kv, 5) == [1, 1, 0, 1, 1] and kv.block_table("b") == [0, 1, 3, 4]
    while s.num_unfinished:
        run_step(s)
    assert b.finish_reason == "length" and b.num_output_tokens == 8
    assert_all_blocks_free(s)


# -- the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llms(bundled_path):
    from brim.runtime import LLM

    def make(enable):
        return LLM(str(bundled_path), device="cpu", enable_prefix_caching=enable,
                   max_model_len=1024, num_gpu_blocks=512)

    return {True: make(True), False: make(False)}


def _greedy(max_tokens=16, **kw):
    from brim.runtime import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


SYSTEM = (
    "You are a careful assistant for a hardware store. You answer questions about tools, "
    "paint, plumbing, garden supplies and electrical parts. Keep answers short and factual, "
    "mention safety precautions when power tools or chemicals are involved, and never invent "
    "product names or prices. If a customer asks about something the store does not sell, say "
    "so politely and suggest where they might look instead. Opening hours are 8am to 6pm on "
    "weekdays and 9am to 4pm on Saturdays; the store is closed on Sundays and public holidays. "
    "Returns are accepted within thirty days with a receipt. Deliveries within ten miles are "
    "free for orders above fifty dollars. Staff can cut keys, mix paint, and cut timber to size."
)


@pytest.mark.slow
def test_greedy_multiturn_chat_is_identical_with_and_without_caching(llms):
    questions = ["What are your opening hours?", "Can you cut timber for me?",
                 "And do you deliver to my house?"]
    transcripts = {}
    for enable, llm in llms.items():
        before = llm.engine.get_stats().prefix_cache_hits
        messages = [{"role": "system", "content": SYSTEM}]
        answers = []
        for q in questions:
            messages.append({"role": "user", "content": q})
            out = llm.chat(messages, _greedy(), use_tqdm=False)[0]
            answers.append(out.outputs[0].token_ids)
            messages.append({"role": "assistant", "content": out.outputs[0].text})
        transcripts[enable] = answers
        hits = llm.engine.get_stats().prefix_cache_hits - before
        assert (hits > 0) == enable
    assert transcripts[True] == transcripts[False]


@pytest.mark.slow
def test_greedy_batch_sharing_a_system_prompt_is_identical_with_and_without_caching(llms):
    tokenizer = llms[True].get_tokenizer()
    system = SYSTEM + (
        " Paint can be tinted to any colour chart sample while you wait; allow fifteen minutes."
        " Power tools can be rented by the day with a refundable deposit and photo ID."
        " Gift cards never expire and can be used for rentals and deliveries as well."
    )
    assert len(tokenizer.encode(system)) >= 190  # ~200 tokens
    conversations = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in ["Do you sell paint?", "When do you close on Saturday?", "Can I return a drill?",
                  "Do you cut keys?", "Do you sell bicycles?", "Is delivery free?"]
    ]
    results = {}
    for enable, llm in llms.items():
        before = llm.engine.get_stats()
        outs = llm.chat(conversations, _greedy(), use_tqdm=False)
        results[enable] = [o.outputs[0].token_ids for o in outs]
        hits = llm.engine.get_stats().prefix_cache_hits - before.prefix_cache_hits
        assert (hits > 0) == enable
        if enable:
            assert all(o.num_cached_tokens > 0 for o in outs[1:])
    assert results[True] == results[False]


@pytest.mark.slow
def test_hit_counter_counts_exactly_the_reused_tokens(llms):
    engine = llms[True].engine
    bs = engine.config.cache.block_size
    assert bs == 16
    engine.kv_cache.pool.reset_prefix_cache()
    before = engine.get_stats()
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks + 8

    def run(req_id, token_ids):
        engine.add_request(req_id, token_ids, _greedy(ignore_eos=True))
        final = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    final = o
        return final

    first = run("pc-a", prompt)  # cold: no hits; caches 3 full blocks (40 + 15 computed)
    run("pc-b", prompt[:35] + list(range(2000, 2010)))  # shares 35 tokens: 2 blocks = 32
    run("pc-c", prompt)  # exact repeat: at most 39 tokens -> 2 blocks = 32
    history = prompt + list(first.outputs[0].token_ids) + [3000, 3001, 3002, 3003]  # 60
    run("pc-d", history)  # next turn: 3 full blocks, incl. the first answer's tokens = 48
    stats = engine.get_stats()
    assert stats.prefix_cache_queries - before.prefix_cache_queries == 40 + 45 + 40 + 60
    assert stats.prefix_cache_hits - before.prefix_cache_hits == 0 + 2 * bs + 2 * bs + 3 * bs
