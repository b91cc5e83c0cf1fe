"""Continuous batching.

The one rule: every request has num_computed_tokens, which catches up with its
num_tokens under a per-step budget of max_num_batched_tokens tokens and max_num_seqs
requests. Running requests are served first, in admission order; when the KV cache
runs out of blocks the newest running request is preempted (its blocks freed, its
tokens recomputed when it is re-admitted). Waiting requests are admitted first come,
first served, only in steps without preemption. Chunked prefill, prefix-cache hits and
recompute after preemption all fall out of the rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from brim.runtime.config import SchedulerConfig
from brim.runtime.engine.kv_cache_manager import KVCacheManager
from brim.runtime.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed for it this step
    start: int  # its num_computed_tokens before this step
    # Physical block ids holding its tokens 0 .. start + num_new_tokens - 1, in order.
    block_table: list[int] = field(default_factory=list)
    # Speculative decoding: guessed tokens computed after its last one (part of
    # num_new_tokens); the target's logits at the last token and at each guess decide.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so its logits give a token."""
        return (self.start + self.num_new_tokens
                == len(self.request.all_token_ids) + len(self.spec_token_ids))


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    preempted: list[str] = field(default_factory=list)  # req_ids, in preemption order

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """lookahead: slots past a step's tokens to give each request when the pool has them,
    for a draft model to write its guesses' KV into after the step (engine/draft.py);
    never a reason to preempt."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager,
                 lookahead: int = 0) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.lookahead = lookahead
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = len(request.all_token_ids) - request.num_computed_tokens
            # A decode with guesses computes them too, as far as the budget goes.
            spec = (request.spec_token_ids[:budget - 1]
                    if num_new == 1 and request.spec_token_ids else [])
            num_new = min(num_new + len(spec), budget)
            while not self._allocate(request, num_new):
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                out.preempted.append(victim.req_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(
                    request, num_new, request.num_computed_tokens,
                    self.kv_cache.block_table(request.req_id), spec))
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing newer is left to serve

        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            hits, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self._allocate(request, num_new, hits):
                break  # FCFS: nobody jumps the queue while the head waits for blocks
            self.waiting.popleft()
            self.kv_cache.record_prefix_lookup(request.num_tokens, num_cached)
            request.num_computed_tokens = num_cached
            if request.status == RequestStatus.WAITING:  # first admission only
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, num_cached,
                                                  self.kv_cache.block_table(request.req_id)))
            budget -= num_new
        return out

    def _allocate(self, request: Request, num_new: int, hits=()) -> bool:
        """Slots for num_new more tokens, plus the lookahead when the pool has it."""
        if self.lookahead and self.kv_cache.allocate_slots(request, num_new + self.lookahead,
                                                           hits):
            return True
        return self.kv_cache.allocate_slots(request, num_new, hits)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.spec_draft_span = None  # its blocks are gone, and the draft's KV with them
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput,
               sampled: dict[str, list[int]]) -> list[tuple[Request, int]]:
        """Advance the scheduled requests; append sampled tokens; finish on stop or length.

        sampled: req_id -> the tokens the step gives it (one, or with speculation the
        accepted guesses and one more). Returns (request, number of tokens appended) for
        each request that received tokens this step; tokens past a stop are dropped.
        """
        advanced = []
        for s in out.scheduled:
            request = s.request
            if not s.samples or request.is_finished:
                request.num_computed_tokens += s.num_new_tokens
                continue
            tokens = sampled[request.req_id]
            # KV is valid for the last token and the accepted guesses (all tokens but the
            # newest); a rejected guess's KV lies beyond, in slots given back or overwritten.
            request.num_computed_tokens += (s.num_new_tokens - len(s.spec_token_ids)
                                            + len(tokens) - 1)
            if s.spec_token_ids:  # roll the block table back to what holds computed KV
                self.kv_cache.trim(request, request.num_computed_tokens + self.lookahead)
            num_appended = 0
            for token in tokens:
                request.append_token(token)
                num_appended += 1
                reason, stop_reason = self._stop_reason(request, token)
                if reason is not None:
                    self.finish(request, reason, stop_reason)
                    break
            advanced.append((request, num_appended))
        return advanced

    def _stop_reason(self, request: Request, token: int) -> tuple[str | None, int | None]:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop", token
            if token in request.eos_token_ids:
                return "stop", None
        if request.num_output_tokens >= request.max_tokens:
            return "length", None
        if request.num_tokens >= self.config.max_model_len:
            return "length", None
        return None, None

    def finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request (stop, length or abort) and return its blocks to the pool now."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
