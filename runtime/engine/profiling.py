"""Measure the KV-cache budget on CUDA: what is left after weights and one peak forward.

    budget = total x gpu_memory_utilization - peak torch memory of a profiling forward of
             max_num_batched_tokens tokens (weights included) - non-torch memory
"""

from __future__ import annotations

import logging

import torch

from brim.runtime.config import EngineConfig
from brim.runtime.engine.model_runner import ModelRunner
from brim.runtime.engine.request import Request
from brim.runtime.engine.scheduler import ScheduledRequest, SchedulerOutput
from brim.runtime.planner.report import MemoryUse
from brim.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@torch.inference_mode()
def profile_memory(config: EngineConfig, model, block_bytes: int) -> MemoryUse:
    """The measured memory use, with the blocks of block_bytes that the budget holds."""
    device = torch.device(config.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    _, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)

    # The heaviest step the scheduler can form: max_num_batched_tokens tokens over as many
    # sequences as may share a step (each sampling, so the logits have as many rows as
    # serving can produce), none longer than max_model_len.
    num_tokens = config.scheduler.max_num_batched_tokens
    block_size = config.cache.block_size
    num_seqs = max(min(config.scheduler.max_num_seqs, num_tokens),
                   -(-num_tokens // config.model.max_model_len))
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    num_blocks = sum(-(-n // block_size) for n in lengths)
    runner = ModelRunner(config, model, num_blocks)
    out, next_block = SchedulerOutput(), 0
    for i, n in enumerate(lengths):
        request = Request(f"profile-{i}", [0] * n, SamplingParams(max_tokens=1), max_tokens=1,
                          eos_token_ids=frozenset())
        blocks = -(-n // block_size)
        out.scheduled.append(ScheduledRequest(request, n, 0,
                                              list(range(next_block, next_block + blocks))))
        next_block += blocks
    runner.execute(out)
    torch.cuda.synchronize(device)
    kv_profile_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    peak = torch.cuda.max_memory_allocated(device) - kv_profile_bytes
    del runner
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info(device)
    # What the process holds outside torch's allocator: CUDA context, cuBLAS workspaces.
    non_torch = (total - free_after) - torch.cuda.memory_reserved(device)
    utilization = config.cache.gpu_memory_utilization
    budget = int(total * utilization - peak - non_torch)
    measured = MemoryUse(gpu_memory_bytes=total, gpu_memory_utilization=utilization,
                         weights_bytes=weights, activation_bytes=peak - weights,
                         non_torch_bytes=non_torch, non_kv_bytes=peak + non_torch,
                         num_gpu_blocks=max(budget, 0) // block_bytes)
    logger.info("measured memory: weights %.2f GiB, activations %.2f GiB, non-torch %.2f GiB, "
                "KV budget %.2f GiB of %.2f GiB", weights / 2**30, (peak - weights) / 2**30,
                non_torch / 2**30, max(budget, 0) / 2**30, total / 2**30)
    return measured
