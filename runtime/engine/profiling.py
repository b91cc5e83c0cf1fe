"""Measure the KV-cache budget on CUDA: what is left after weights and one peak forward.

    budget = total x gpu_memory_utilization - peak torch memory of a profiling forward of
             max_num_batched_tokens tokens (weights included) - non-torch memory
"""

from __future__ import annotations

import logging

import torch

from brim.runtime.engine.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@torch.inference_mode()
def measure_kv_budget(engine) -> tuple[int, dict]:
    """Returns (bytes available for the KV cache, the measured figures)."""
    from brim.runtime.engine.model_runner import ModelRunner
    from brim.runtime.engine.request import Request
    from brim.runtime.sampling_params import SamplingParams

    config = engine.config
    device = torch.device(config.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free_before, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)

    # The heaviest step the scheduler can form: max_num_batched_tokens tokens over as many
    # sequences as may share a step (each sampling, so the logits have as many rows as
    # serving can produce), none longer than max_model_len.
    num_tokens = config.scheduler.max_num_batched_tokens
    block_size = config.cache.block_size
    num_seqs = max(min(config.scheduler.max_num_seqs, num_tokens),
                   -(-num_tokens // engine.max_model_len))
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    num_blocks = sum(-(-n // block_size) for n in lengths)
    runner = ModelRunner(config, engine.model, num_blocks)
    out, tables, next_block = SchedulerOutput(), [], 0
    for i, n in enumerate(lengths):
        request = Request(f"profile-{i}", [0] * n, SamplingParams(max_tokens=1), max_tokens=1,
                          eos_token_ids=frozenset())
        out.scheduled.append(ScheduledRequest(request, n, 0))
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    runner.execute(out, tables)
    torch.cuda.synchronize(device)
    kv_profile_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    peak = torch.cuda.max_memory_allocated(device) - kv_profile_bytes
    del runner
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info(device)
    # What the process holds outside torch's allocator: CUDA context, cuBLAS workspaces.
    non_torch = (total - free_after) - torch.cuda.memory_reserved(device)
    budget = int(total * config.cache.gpu_memory_utilization - peak - non_torch)
    measured = {
        "total_bytes": total,
        "weights_bytes": weights,
        "peak_activation_bytes": peak - weights,
        "non_torch_bytes": non_torch,
        "non_kv_bytes": peak + non_torch,
        "kv_budget_bytes": budget,
    }
    logger.info("measured memory: %s", {k: f"{v / 2**30:.2f} GiB" for k, v in measured.items()})
    return max(budget, 0), measured
