"""Launching the Triton attention kernels: which kernel, which tile sizes, how many splits.

A batch whose token count equals its sequence count is all decode (one query each): it
goes to the split-K decode kernel (`attention_decode.py`). Anything else (prefill,
chunked prefill, prefix-cache hits, mixed batches) goes to the varlen kernel
(`attention_prefill.py`), which handles decode sequences inside a mixed batch too.
Neither choice reads a device tensor back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.jit import JITFunction

from brim.kernels.attention_decode import _decode_kernel, _reduce_splits_kernel
from brim.kernels.attention_prefill import _prefill_kernel
from brim.kernels.launch import Launch
from brim.kernels.reference import is_fp8_cache

LOG2_E = 1.4426950408889634
NO_WINDOW = 1 << 30  # a sliding window longer than any context
MAX_SPLITS = 64

# Under TRITON_INTERPRET=1 `triton.jit` returns an interpreter function instead.
IS_INTERPRETED = not isinstance(_decode_kernel, JITFunction)


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    block_n: int  # context positions per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    block_m: int  # rows per program: query tokens x padded GQA group
    block_n: int  # context positions per tile
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tile sizes for the decode kernel (not autotuned: chosen for H100 shared memory)."""
    if IS_INTERPRETED:
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1)
    wide = triton.next_power_of_2(head_dim) * dtype.itemsize > 256  # 256-dim or fp32 rows
    return DecodeConfig(block_n=32 if wide else 64, num_warps=4, num_stages=3)


def prefill_config(head_dim: int, group: int, dtype: torch.dtype) -> PrefillConfig:
    """Tile sizes for the varlen kernel; block_m always covers one padded GQA group."""
    group_pad = triton.next_power_of_2(group)
    if IS_INTERPRETED:
        return PrefillConfig(block_m=max(32, group_pad), block_n=16, num_warps=1, num_stages=1)
    wide = triton.next_power_of_2(head_dim) * dtype.itemsize > 256
    if wide:
        return PrefillConfig(block_m=max(64, group_pad), block_n=32, num_warps=4, num_stages=2)
    # Swept on an H100 over block_m {64, 128} x block_n {32, 64, 128} x warps {4, 8} x
    # stages {2, 3, 4} (Llama-3-8B heads, bf16; docs/benchmarks.md): 128 x 32, 4 warps and
    # 2 stages was within 2% of the best (3 stages) at every context; 3 stages is not used
    # until its bf16 test failures on the H100 are explained (docs/kernels.md). The previous
    # 128 x 64, 8 warps ran 4-22% slower.
    return PrefillConfig(block_m=max(128, group_pad), block_n=32, num_warps=4, num_stages=2)


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, block_n: int,
                      num_sms: int) -> int:
    """Enough context partitions to give every SM a few programs, and no more."""
    num_tiles = triton.cdiv(max_context, block_n)
    wanted = triton.cdiv(4 * num_sms, num_seqs * num_kv_heads)
    return max(1, min(wanted, num_tiles, MAX_SPLITS))


def paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    *,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The Triton path of `brim.kernels.paged_attention`; same contract as the reference.

    max_seq_len: an upper bound of seq_lens known on the host; it sizes the decode split
    (default: the block table's width in tokens). num_splits forces the decode split.
    k_scale, v_scale: an FP8 cache's scales (ignored for other caches).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for launch in plan_launches(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                scale, out, sliding_window=sliding_window,
                                max_seq_len=max_seq_len, num_splits=num_splits,
                                k_scale=k_scale, v_scale=v_scale):
        launch.run()
    return out


def plan_launches(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out, *,
                  sliding_window=None, max_seq_len=None, num_splits=None, k_scale=1.0,
                  v_scale=1.0) -> list[Launch]:
    """The launches computing paged attention into `out`, without running them.

    An FP8 cache (float8_e4m3fn) is handed to the kernels as its uint8 bit patterns; its
    K scale folds into the softmax scale, its V scale multiplies the output.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} "
                         f"and {v_cache.stride()}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if num_tokens == 0:
        return []

    group = num_heads // num_kv_heads
    fp8 = is_fp8_cache(k_cache)
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    common = dict(
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        block_tables_ptr=block_tables, query_start_loc_ptr=query_start_loc,
        seq_lens_ptr=seq_lens,
        qk_scale=scale * LOG2_E * (k_scale if fp8 else 1.0),
        v_scale=float(v_scale) if fp8 else 1.0,
        sliding_window=NO_WINDOW if sliding_window is None else sliding_window,
        stride_q_t=q.stride(0), stride_q_h=q.stride(1), stride_q_d=q.stride(2),
        stride_out_t=out.stride(0), stride_out_h=out.stride(1), stride_out_d=out.stride(2),
        stride_cache_b=k_cache.stride(0), stride_cache_s=k_cache.stride(1),
        stride_cache_h=k_cache.stride(2), stride_cache_d=k_cache.stride(3),
        stride_block_tables=block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        UPCAST=IS_INTERPRETED or q.dtype == torch.float32,
        FP8_KV=fp8,
    )
    if num_tokens == num_seqs:
        return _plan_decode(out, common, num_seqs, num_kv_heads, num_heads, block_tables,
                            max_seq_len, sliding_window, num_splits)
    config = prefill_config(head_dim, group, q.dtype)
    block_q = config.block_m // triton.next_power_of_2(group)
    return [Launch(
        kernel=_prefill_kernel,
        grid=(num_tokens // block_q + num_seqs, num_kv_heads),
        kwargs=dict(out_ptr=out, num_seqs=num_seqs,
                    GROUP_PAD=triton.next_power_of_2(group), BLOCK_Q=block_q,
                    BLOCK_N=config.block_n, num_warps=config.num_warps,
                    num_stages=config.num_stages, **common))]


def _plan_decode(out, common, num_seqs, num_kv_heads, num_heads, block_tables, max_seq_len,
                 sliding_window, num_splits) -> list[Launch]:
    head_dim, head_dim_pad = common["HEAD_DIM"], common["HEAD_DIM_PAD"]
    config = decode_config(head_dim, out.dtype)
    max_context = max_seq_len or block_tables.shape[1] * common["BLOCK_SIZE"]
    if sliding_window is not None:
        # One extra tile: partitions start on the tile boundary below the window.
        max_context = min(max_context, sliding_window + config.block_n)
    if num_splits is None:
        num_sms = (torch.cuda.get_device_properties(out.device).multi_processor_count
                   if out.is_cuda else 2)
        num_splits = num_decode_splits(num_seqs, num_kv_heads, max_context, config.block_n,
                                       num_sms)
    tiles_per_split = triton.cdiv(triton.cdiv(max_context, config.block_n), num_splits)
    if num_splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad,
                                  dtype=torch.float32, device=out.device)
        partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                                  device=out.device)
    else:
        partial_out = partial_lse = out  # unused by the kernel
    launches = [Launch(
        kernel=_decode_kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        kwargs=dict(out_ptr=out, partial_out_ptr=partial_out, partial_lse_ptr=partial_lse,
                    partition_size=tiles_per_split * config.block_n,
                    GROUP_PAD=max(16, triton.next_power_of_2(common["GROUP"])),
                    BLOCK_N=config.block_n, NUM_SPLITS=num_splits,
                    num_warps=config.num_warps, num_stages=config.num_stages, **common))]
    if num_splits > 1:
        launches.append(Launch(
            kernel=_reduce_splits_kernel,
            grid=(num_seqs, num_heads),
            kwargs=dict(out_ptr=out, partial_out_ptr=partial_out, partial_lse_ptr=partial_lse,
                        query_start_loc_ptr=common["query_start_loc_ptr"],
                        stride_out_t=out.stride(0), stride_out_h=out.stride(1),
                        stride_out_d=out.stride(2),
                        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                        NUM_SPLITS=num_splits,
                        NUM_SPLITS_PAD=triton.next_power_of_2(num_splits),
                        num_warps=4, num_stages=1)))
    return launches
