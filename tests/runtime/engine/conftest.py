"""Fixtures and helpers for the engine's component tests (no model unless a test asks)."""

from __future__ import annotations

import zlib

import pytest

from brim.runtime.config import SchedulerConfig
from brim.runtime.engine.kv_cache_manager import KVCacheManager
from brim.runtime.engine.request import Request
from brim.runtime.engine.scheduler import Scheduler, SchedulerOutput
from brim.runtime.sampling_params import SamplingParams

EOS = 2  # the bundled SmolLM2's EOS id; any id works for the model-free tests


@pytest.fixture(scope="session")
def bundled_path(bundled_model_dir):
    """The converted bundled SmolLM2 checkpoint (converted on first use, ~40 s in CI)."""
    return bundled_model_dir


@pytest.fixture(scope="session")
def tokenizer(bundled_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_path))


def make_request(
    req_id: str,
    num_prompt_tokens: int = 4,
    *,
    max_tokens: int = 16,
    prompt_token_ids: list[int] | None = None,
    eos_token_ids: frozenset[int] = frozenset({EOS}),
    cache_salt: str | None = None,
    **params,
) -> Request:
    """A request whose prompt tokens are distinct per req_id unless given explicitly,
    so that prefix caching never shares blocks by accident."""
    if prompt_token_ids is None:
        base = 1000 * (zlib.crc32(req_id.encode()) % 1000 + 1)
        prompt_token_ids = [base + i for i in range(num_prompt_tokens)]
    params.setdefault("max_tokens", max_tokens)
    return Request(req_id, prompt_token_ids, SamplingParams(**params), max_tokens=max_tokens,
                   eos_token_ids=eos_token_ids, cache_salt=cache_salt)


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_prefix_caching: bool = False,
) -> Scheduler:
    kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len)
    return Scheduler(config, kv_cache)


def feed(scheduler: Scheduler, out: SchedulerOutput, tokens: dict[str, int] | None = None,
         default_token: int = 7) -> None:
    """Play the sampler: hand every request whose step samples a token (tokens[req_id],
    else default_token). `samples` is read before update() appends to the request."""
    tokens = tokens or {}
    sampled = {s.request.req_id: [tokens.get(s.request.req_id, default_token)]
               for s in out.scheduled if s.samples}
    scheduler.update(out, sampled)


def run_step(scheduler: Scheduler, tokens: dict[str, int] | None = None,
             default_token: int = 7) -> SchedulerOutput:
    """One engine step without a model: schedule, then feed."""
    out = scheduler.schedule()
    feed(scheduler, out, tokens, default_token)
    return out


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    """(req_id, num_new_tokens) per scheduled request, in batch order."""
    return [(s.request.req_id, s.num_new_tokens) for s in out.scheduled]


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    pool = scheduler.kv_cache.pool
    assert scheduler.kv_cache.req_blocks == {}
    assert pool.num_free_blocks == pool.num_blocks
    assert [b.ref_cnt for b in pool.blocks] == [0] * pool.num_blocks
