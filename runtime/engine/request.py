"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time

import torch

from brim.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV dropped; resumes by recompute
    FINISHED = "finished"


class Request:
    """One sequence being generated.

    all_token_ids is prompt + output. num_computed_tokens counts the tokens whose KV is
    in the cache; each step computes up to num_tokens - num_computed_tokens of them.
    When it catches up, the last position's logits give the next token. Prefill, chunked
    prefill, decode and recompute after preemption are all this one rule.
    """

    __slots__ = (
        "req_id", "parent_id", "index", "prompt", "prompt_token_ids", "all_token_ids",
        "num_prompt_tokens", "params", "max_tokens", "eos_token_ids", "num_computed_tokens",
        "num_cached_tokens", "status", "finish_reason", "stop_reason", "arrival_time",
        "generator", "logprobs", "cumulative_logprob", "text", "detokenizer",
        "num_preemptions", "first_token_time", "cache_salt", "block_hashes",
        "spec_token_ids", "spec_state", "spec_probs", "spec_draft_span", "spec_backoff",
        "final_only",
    )

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        max_tokens: int,
        eos_token_ids: frozenset[int],
        prompt: str | None = None,
        parent_id: str | None = None,
        index: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.req_id = req_id
        self.parent_id = parent_id or req_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.final_only = params.output_kind == "final_only"  # no output until it ends
        self.max_tokens = max_tokens
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.text = ""
        self.detokenizer = None
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []  # of its full blocks, extended as tokens arrive
        # Speculative decoding: the proposer's guesses for the next step (not tokens yet),
        # and the proposer's own per-request state.
        self.spec_token_ids: list[int] = []
        self.spec_state = None
        # A draft model's distribution for each guess it sampled ([k, vocab]); None when the
        # guesses are certain (n-gram lookup, greedy drafts).
        self.spec_probs = None
        # A draft model's proposal wrote its KV for positions [start, end) of the last token
        # and its guesses (engine/draft.py); None when nothing of the kind is pending.
        self.spec_draft_span: tuple[int, int] | None = None
        self.spec_backoff = None  # speculative.AcceptanceBackOff, from its first check

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
