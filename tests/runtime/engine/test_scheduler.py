"""The scheduler driven directly, no model: each step schedules, then the test plays the
sampler by handing a token to every request whose ScheduledRequest.samples is true.

Pools are tiny (block_size 4) so every block id, chunk size and preemption is exact.
"""

from __future__ import annotations

import random

import pytest

from brim.runtime.engine.request import RequestStatus
from brim.runtime.engine.scheduler import ScheduledRequest

from tests.runtime.engine.conftest import (EOS, assert_all_blocks_free, feed, make_request,
                                           make_scheduler, run_step, scheduled)


def table(scheduler, req_id):
    return scheduler.kv_cache.block_table(req_id)


def waiting(scheduler):
    return [r.req_id for r in scheduler.waiting]


def running(scheduler):
    return [r.req_id for r in scheduler.running]


# -- samples --------------------------------------------------------------------------------


def test_samples_only_when_the_step_reaches_the_last_token():
    request = make_request("a", 10)
    assert not ScheduledRequest(request, 4, 0).samples
    assert not ScheduledRequest(request, 4, 5).samples
    assert ScheduledRequest(request, 4, 6).samples
    assert ScheduledRequest(request, 10, 0).samples
    request.append_token(5)
    assert not ScheduledRequest(request, 10, 0).samples  # 11 tokens now
    assert ScheduledRequest(request, 1, 10).samples


# -- chunked prefill and limits ------------------------------------------------------------


def test_chunked_prefill_under_a_small_token_budget():
    sched = make_scheduler(16, max_num_seqs=4, max_num_batched_tokens=8)
    a = make_request("a", 20, max_tokens=3)
    sched.add(a)
    expected = [  # num_new_tokens, samples, block table after the step
        (8, False, [0, 1]),
        (8, False, [0, 1, 2, 3]),
        (4, True, [0, 1, 2, 3, 4]),
        (1, True, [0, 1, 2, 3, 4, 5]),  # 21 tokens: a 6th block
    ]
    for num_new, samples, blocks in expected:
        out = sched.schedule()
        assert scheduled(out) == [("a", num_new)]
        assert out.scheduled[0].samples is samples
        feed(sched, out)
        assert out.num_batched_tokens == num_new
        assert table(sched, "a") == blocks
    assert a.num_computed_tokens == 21 and a.output_token_ids == [7, 7]
    out = run_step(sched)
    assert scheduled(out) == [("a", 1)]
    assert a.finish_reason == "length" and a.output_token_ids == [7, 7, 7]
    assert_all_blocks_free(sched)
    assert sched.schedule().scheduled == []


def test_budget_is_shared_running_first_then_a_chunk_of_the_next_prompt():
    sched = make_scheduler(16, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add(make_request("a", 6))
    sched.add(make_request("b", 6))
    out = sched.schedule()
    assert scheduled(out) == [("a", 6), ("b", 2)]
    assert [s.samples for s in out.scheduled] == [True, False]
    feed(sched, out)
    assert table(sched, "a") == [0, 1] and table(sched, "b") == [2]
    out = sched.schedule()
    assert scheduled(out) == [("a", 1), ("b", 4)]
    assert [s.samples for s in out.scheduled] == [True, True]
    feed(sched, out)
    assert table(sched, "a") == [0, 1] and table(sched, "b") == [2, 3]
    out = run_step(sched)
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert table(sched, "a") == [0, 1] and table(sched, "b") == [2, 3]
    run_step(sched)  # a computes its 9th token, b its 8th
    assert table(sched, "a") == [0, 1, 4] and table(sched, "b") == [2, 3]
    run_step(sched)
    assert table(sched, "a") == [0, 1, 4] and table(sched, "b") == [2, 3, 5]


def test_max_num_seqs_limits_running_requests():
    sched = make_scheduler(4, max_num_seqs=2, max_num_batched_tokens=64)
    for req_id in "abc":
        sched.add(make_request(req_id, 4, max_tokens=2))
    out = run_step(sched)
    assert scheduled(out) == [("a", 4), ("b", 4)]
    assert waiting(sched) == ["c"]
    assert table(sched, "a") == [0] and table(sched, "b") == [1]
    out = run_step(sched)  # both reach max_tokens; c still may not join this step
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert running(sched) == [] and waiting(sched) == ["c"]
    # a freed [0, 2] tail first, then b freed [1, 3]: the queue is 2 0 3 1.
    assert list(sched.kv_cache.pool.free_queue) == [2, 0, 3, 1]
    out = run_step(sched)
    assert scheduled(out) == [("c", 4)]
    assert table(sched, "c") == [2]


def test_fcfs_a_waiting_head_without_blocks_holds_back_those_behind_it():
    sched = make_scheduler(4, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request("a", 8)
    sched.add(a)
    sched.add(make_request("b", 12))  # needs 3 blocks
    sched.add(make_request("c", 4))  # needs 1
    out = run_step(sched)
    assert scheduled(out) == [("a", 8)]
    assert table(sched, "a") == [0, 1]
    assert waiting(sched) == ["b", "c"]
    out = run_step(sched)
    assert scheduled(out) == [("a", 1)]  # a's 9th token takes block 2
    assert table(sched, "a") == [0, 1, 2]
    out = run_step(sched)
    assert scheduled(out) == [("a", 1)]  # block 3 is free, b needs 3, c waits behind b
    assert waiting(sched) == ["b", "c"]
    sched.finish(a, "abort")
    assert list(sched.kv_cache.pool.free_queue) == [3, 2, 1, 0]
    out = run_step(sched)
    assert scheduled(out) == [("b", 12), ("c", 4)]
    assert table(sched, "b") == [3, 2, 1] and table(sched, "c") == [0]


# -- preemption ----------------------------------------------------------------------------


def _three_running_and_one_waiting():
    """a, b, c hold 2 blocks each of a 6-block pool and have 9 tokens; d waits."""
    sched = make_scheduler(6, max_num_seqs=4, max_num_batched_tokens=64)
    for req_id in "abc":
        sched.add(make_request(req_id, 8, max_tokens=10))
    out = run_step(sched)
    assert scheduled(out) == [("a", 8), ("b", 8), ("c", 8)]
    assert [table(sched, r) for r in "abc"] == [[0, 1], [2, 3], [4, 5]]
    sched.add(make_request("d", 4))
    return sched


def test_preemption_takes_the_newest_running_request_first():
    sched = _three_running_and_one_waiting()
    out = run_step(sched)
    # a needs a 3rd block: c (the newest) is preempted, its blocks freed tail first (5, 4).
    assert out.preempted == ["c"]
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert table(sched, "a") == [0, 1, 5] and table(sched, "b") == [2, 3, 4]
    assert table(sched, "c") == []
    c = sched.waiting[0]
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_token_ids == [7]  # its tokens are kept, its KV recomputed
    # The preempted request goes to the front, ahead of d, and no one is admitted.
    assert waiting(sched) == ["c", "d"]
    assert sched.num_preemptions == 1


def test_preempted_request_resumes_first_and_recomputes_all_its_tokens():
    sched = _three_running_and_one_waiting()
    run_step(sched)  # c preempted
    a = sched.running[0]
    sched.finish(a, "abort")  # frees 5, 1, 0
    out = sched.schedule()
    assert out.preempted == []
    # c: 8 prompt + 1 output token recomputed in one go, sampling its 2nd token. d (1 block)
    # finds no block left.
    assert scheduled(out) == [("b", 1), ("c", 9)]
    assert [s.samples for s in out.scheduled] == [True, True]
    feed(sched, out)
    assert table(sched, "c") == [5, 1, 0]
    assert waiting(sched) == ["d"]
    c = sched.running[1]
    assert c.status == RequestStatus.RUNNING and c.output_token_ids == [7, 7]
    assert c.num_cached_tokens == 0


def test_two_preemptions_in_one_step_keep_arrival_order_at_the_front():
    sched = make_scheduler(6, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make_request("a", 8))
    for req_id in "bcd":
        sched.add(make_request(req_id, 4))
    run_step(sched)
    assert [table(sched, r) for r in "abcd"] == [[0, 1], [2], [3], [4]]
    sched.kv_cache.pool.allocate(1)  # block 5 held elsewhere: the pool is full
    out = run_step(sched)
    # a's 9th token needs a block: d goes, a takes 4. b's 5th token needs one: c goes.
    assert out.preempted == ["d", "c"]
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert table(sched, "a") == [0, 1, 4] and table(sched, "b") == [2, 3]
    assert waiting(sched) == ["c", "d"]
    assert running(sched) == ["a", "b"]


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(4, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request("a", 6, max_tokens=4)
    b = make_request("b", 8)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert table(sched, "a") == [0, 1] and table(sched, "b") == [2, 3]
    out = run_step(sched)  # a fits its 7th token; b's 9th token needs a block
    assert scheduled(out) == [("a", 1)]
    assert out.preempted == ["b"]
    assert b.status == RequestStatus.PREEMPTED and waiting(sched) == ["b"]
    assert list(sched.kv_cache.pool.free_queue) == [3, 2]
    out = run_step(sched)  # b needs 3 blocks, 2 are free
    assert scheduled(out) == [("a", 1)] and out.preempted == []
    out = run_step(sched)  # a's 9th token takes block 3; a reaches max_tokens
    assert scheduled(out) == [("a", 1)]
    assert a.finish_reason == "length"
    out = run_step(sched)
    assert scheduled(out) == [("b", 9)]
    assert table(sched, "b") == [2, 3, 1]
    assert b.output_token_ids == [7, 7]


# -- abort ---------------------------------------------------------------------------------


def test_abort_frees_blocks_of_running_and_waiting_requests_at_once():
    sched = make_scheduler(4, max_num_seqs=4, max_num_batched_tokens=8)
    a = make_request("a", 12)
    b = make_request("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a gets a chunk of 8 tokens (2 blocks); b waits for budget
    assert table(sched, "a") == [0, 1] and waiting(sched) == ["b"]
    sched.finish(a, "abort")
    assert a.finish_reason == "abort" and a.is_finished
    assert running(sched) == []
    assert list(sched.kv_cache.pool.free_queue) == [2, 3, 1, 0]
    sched.finish(b, "abort")
    assert waiting(sched) == [] and b.finish_reason == "abort"
    sched.finish(b, "stop")  # a second finish is a no-op
    assert b.finish_reason == "abort"
    assert_all_blocks_free(sched)
    assert sched.num_unfinished == 0


def test_abort_between_schedule_and_update_gives_no_token():
    sched = make_scheduler(4, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_request("a", 4)
    sched.add(a)
    out = sched.schedule()
    sched.finish(a, "abort")
    assert sched.update(out, {"a": [7]}) == []
    assert a.output_token_ids == [] and a.finish_reason == "abort"
    assert_all_blocks_free(sched)


# -- finishing -----------------------------------------------------------------------------


def _finish(sched, request, tokens):
    """Feed request the given tokens one step at a time until it finishes."""
    sched.add(request)
    for token in tokens:
        run_step(sched, {request.req_id: token})
        if request.is_finished:
            break
    return request


def test_finish_by_max_tokens():
    sched = make_scheduler(8)
    r = _finish(sched, make_request("a", 4, max_tokens=3), [5, 6, 7, 8])
    assert r.output_token_ids == [5, 6, 7]
    assert (r.finish_reason, r.stop_reason) == ("length", None)
    assert_all_blocks_free(sched)


def test_finish_by_eos():
    sched = make_scheduler(8)
    r = _finish(sched, make_request("a", 4), [5, EOS, 6])
    assert r.output_token_ids == [5, EOS]
    assert (r.finish_reason, r.stop_reason) == ("stop", None)
    assert_all_blocks_free(sched)


def test_ignore_eos_generates_past_eos():
    sched = make_scheduler(8)
    r = _finish(sched, make_request("a", 4, max_tokens=3, ignore_eos=True), [EOS, EOS, EOS])
    assert r.output_token_ids == [EOS, EOS, EOS] and r.finish_reason == "length"


def test_finish_by_stop_token_id():
    sched = make_scheduler(8)
    r = _finish(sched, make_request("a", 4, stop_token_ids=[42, 43]), [5, 43, 6])
    assert r.output_token_ids == [5, 43]
    assert (r.finish_reason, r.stop_reason) == ("stop", 43)
    assert_all_blocks_free(sched)


def test_finish_by_max_model_len():
    sched = make_scheduler(8, max_num_batched_tokens=32, max_model_len=12)
    r = _finish(sched, make_request("a", 9, max_tokens=100), [5] * 10)
    assert r.num_tokens == 12 and r.output_token_ids == [5, 5, 5]
    assert (r.finish_reason, r.stop_reason) == ("length", None)
    assert_all_blocks_free(sched)


def test_min_tokens_suppresses_eos_and_stop_tokens():
    sched = make_scheduler(8)
    request = make_request("a", 4, min_tokens=3, stop_token_ids=[42])
    r = _finish(sched, request, [EOS, 42, EOS, 6])
    assert r.output_token_ids == [EOS, 42, EOS]
    assert (r.finish_reason, r.stop_reason) == ("stop", None)
    request = make_request("b", 4, min_tokens=2, stop_token_ids=[42])
    r = _finish(sched, request, [42, 42, 6])
    assert r.output_token_ids == [42, 42] and r.stop_reason == 42


# -- everything comes back -----------------------------------------------------------------


@pytest.mark.parametrize("speculative, lookahead", [(False, 0), (True, 0), (True, 3)])
@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_every_block_is_free_after_a_busy_random_workload(enable_prefix_caching, speculative,
                                                          lookahead):
    """speculative: each decode gets up to 3 guesses, and a random number of them is
    accepted (most are rejected): rejected guesses' slots must not leak or be cached.
    lookahead: the slots a draft model writes into, given when the pool has them."""
    rng = random.Random(1234)
    block_size, num_blocks, budget, max_num_seqs, max_model_len = 4, 12, 16, 5, 40
    sched = make_scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=budget, max_model_len=max_model_len,
                           enable_prefix_caching=enable_prefix_caching)
    sched.lookahead = lookahead
    num_with_lookahead = 0
    shared_prefix = [500 + i for i in range(8)]
    requests, num_steps, num_preempted, num_guesses = [], 0, 0, 0
    for i in range(40):
        prompt_len = rng.randint(1, 20)
        prompt = (shared_prefix + [900 + i] * prompt_len)[:prompt_len] if i % 2 else None
        requests.append(make_request(f"r{i}", prompt_len, prompt_token_ids=prompt,
                                     max_tokens=rng.randint(1, max_model_len - prompt_len)))
    pending = list(requests)
    while pending or sched.num_unfinished:
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if speculative:  # the guesses, bounded as Engine._propose bounds them
            for r in sched.running:
                limit = min(r.max_tokens - r.num_output_tokens, max_model_len - r.num_tokens) - 1
                decoding = r.num_tokens - r.num_computed_tokens == 1
                r.spec_token_ids = [rng.choice([11, 12, 13]) for _ in range(rng.randint(0, 3))
                                    ][:max(limit, 0)] if decoding else []
        out = sched.schedule()
        num_steps += 1
        num_preempted += len(out.preempted)
        assert out.num_batched_tokens <= budget
        assert len(out.scheduled) <= max_num_seqs
        assert len({s.request.req_id for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            num_blocks_needed = -(-(s.start + s.num_new_tokens) // block_size)
            most = -(-(s.start + s.num_new_tokens + lookahead) // block_size)
            assert num_blocks_needed <= len(table(sched, s.request.req_id)) <= most
            num_with_lookahead += len(table(sched, s.request.req_id)) > num_blocks_needed
        used = sum(len(blocks) for blocks in sched.kv_cache.req_blocks.values())
        if not enable_prefix_caching:
            assert used == sched.kv_cache.pool.num_used_blocks
        tokens = {}
        for s in out.scheduled:
            if s.samples:
                accepted = s.spec_token_ids[:rng.randint(0, len(s.spec_token_ids))]
                tokens[s.request.req_id] = accepted + [rng.choice([EOS, 11, 12, 13, 14, 15])]
                num_guesses += len(s.spec_token_ids)
        sched.update(out, tokens)
        if speculative:  # a block of guesses never enters the prefix cache
            for r in sched.running:
                assert len(r.block_hashes) <= r.num_tokens // block_size
                # The trim keeps the lookahead: at most what computed tokens + it need.
                assert len(table(sched, r.req_id)) <= -(-(r.num_computed_tokens + lookahead)
                                                         // block_size)
        if sched.running and rng.random() < 0.05:
            sched.finish(rng.choice(sched.running), "abort")
        assert num_steps < 2000
    assert num_preempted > 0  # the pool is small enough to force preemption
    assert num_guesses > 50 if speculative else num_guesses == 0
    assert num_with_lookahead > 20 if lookahead else num_with_lookahead == 0
    assert all(r.is_finished for r in requests)
    for r in requests:
        if r.finish_reason == "length":
            assert r.num_output_tokens == r.max_tokens or r.num_tokens == max_model_len
    assert_all_blocks_free(sched)
