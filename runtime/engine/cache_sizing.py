"""How many KV-cache blocks the engine gets, and the max_model_len they allow.

CUDA: measured (a profiling forward at the step budget, engine.profiling) beside the
planner's prediction for the same GPU and settings. CPU: a documented share of the RAM
available (CacheConfig.cpu_kv_cache_fraction), never more than every sequence at
max_model_len could use. `num_gpu_blocks` caps either (on CPU it is the exact count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from brim.runtime.config import EngineConfig
from brim.runtime.engine.errors import KVCacheTooSmallError
from brim.runtime.planner.dtypes import KV_CACHE_DTYPE_BYTES
from brim.runtime.planner.memory import PlanRequest, plan
from brim.runtime.planner.report import MemoryReport, MemoryUse

logger = logging.getLogger(__name__)


def kv_bytes_per_token(config: EngineConfig) -> int:
    """What one token's K and V cost on one rank (in the KV cache's dtype): the target's,
    plus a draft model's (engine/draft.py), whose cache shares the target's blocks."""
    element = KV_CACHE_DTYPE_BYTES[config.kv_cache_dtype]
    per_token = config.model.facts.kv_bytes_per_token(element,
                                                      config.parallel.tensor_parallel_size)
    if config.draft_model is not None:
        per_token += config.draft_model.facts.kv_bytes_per_token(element)
    return per_token


def size_kv_cache(config: EngineConfig, model, weights_bytes: int,
                  agree: Callable[[int], int] | None = None) -> MemoryReport:
    """The memory report of an engine whose weights are loaded (`model`).

    agree: under tensor parallelism, every rank's block count -> the one all use (the
    smallest: each rank holds the same blocks of its own KV heads). Figures are per rank.
    """
    cache = config.cache
    per_token = kv_bytes_per_token(config)
    block_bytes = per_token * cache.block_size
    requested = config.model.max_model_len
    predicted = measured = None
    if config.device == "cuda":
        measured = _measure(config, model, block_bytes)
        predicted = _predict(config, measured.gpu_memory_bytes)
        num_blocks = measured.num_gpu_blocks
        if cache.num_gpu_blocks is not None:
            num_blocks = min(num_blocks, cache.num_gpu_blocks)
    elif cache.num_gpu_blocks is not None:
        num_blocks = cache.num_gpu_blocks
    else:
        num_blocks = _cpu_num_blocks(config, block_bytes)
    if agree is not None:
        num_blocks = agree(num_blocks)
    max_model_len = requested
    if config.model.auto_max_model_len:
        max_model_len = min(requested, num_blocks * cache.block_size) or requested
    return MemoryReport(device=config.device,
                        gpu_memory_utilization=cache.gpu_memory_utilization,
                        block_size=cache.block_size,
                        kv_bytes_per_token=per_token, weights_bytes=weights_bytes,
                        num_gpu_blocks=max(num_blocks, 0), max_model_len=max_model_len,
                        requested_max_model_len=requested, predicted=predicted,
                        measured=measured)


def fit_max_model_len(config: EngineConfig, report: MemoryReport) -> EngineConfig:
    """The config the engine runs with: as given when one max_model_len request fits, with
    max_model_len lowered to the cache's capacity when it was "auto"; else refused."""
    capacity = report.kv_cache_tokens
    if capacity >= config.model.max_model_len:
        return config
    if config.model.auto_max_model_len and capacity > 0:
        logger.warning("max_model_len auto: the model's %d tokens do not fit the KV cache; "
                       "serving with max_model_len=%d, what the KV cache holds",
                       config.model.max_model_len, capacity)
        return config.with_max_model_len(capacity)
    hint = ("raise num_gpu_blocks" if config.device == "cpu" or config.cache.num_gpu_blocks
            else "raise gpu_memory_utilization or use a GPU with more memory")
    raise KVCacheTooSmallError(report.num_gpu_blocks, config.cache.block_size,
                               config.model.max_model_len, hint, report)


def _measure(config: EngineConfig, model, block_bytes: int) -> MemoryUse:
    from brim.runtime.engine.profiling import profile_memory

    return profile_memory(config, model, block_bytes)


def _predict(config: EngineConfig, gpu_memory_bytes: int) -> MemoryUse | None:
    """The planner's figures for this GPU and these settings, to report beside the measured."""
    try:
        predicted = plan(PlanRequest(
            checkpoint=config.model.checkpoint, gpu_memory_bytes=gpu_memory_bytes,
            gpu_memory_utilization=config.cache.gpu_memory_utilization,
            max_model_len=config.model.max_model_len,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            block_size=config.cache.block_size, dtype=config.model.dtype,
            tensor_parallel_size=config.parallel.tensor_parallel_size,
            kv_cache_dtype=config.kv_cache_dtype,
            quantization="fp8" if (config.model.quantization is not None
                                   and config.model.quantization.on_load) else None))
    except (ValueError, KeyError) as exc:  # a prediction never stops a measured start
        logger.warning("could not predict memory for comparison: %s", exc)
        return None
    return predicted.memory_use()


def _cpu_num_blocks(config: EngineConfig, block_bytes: int) -> int:
    import psutil

    cache = config.cache
    # Tensor-parallel ranks on one CPU share its RAM: each takes its part of the fraction.
    budget = (psutil.virtual_memory().available * cache.cpu_kv_cache_fraction
              / config.parallel.tensor_parallel_size)
    most_useful = config.scheduler.max_num_seqs * -(-config.model.max_model_len // cache.block_size)
    return min(int(budget // block_bytes), most_useful)
