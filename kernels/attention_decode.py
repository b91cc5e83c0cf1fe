"""Decode attention: one query token per sequence over its paged context, split-K.

Grid (num_seqs, num_kv_heads, num_splits). A program takes one sequence, one KV head and
one partition of the context, and attends with *all* query heads of that KV head's group
at once: the group's GROUP rows (padded to GROUP_PAD >= 16 for tl.dot) share every K/V
tile, so the cache is read once per group rather than once per query head.

With num_splits == 1 the program writes the output. Otherwise each partition writes its
normalised partial output and log-sum-exp (base 2), and `_reduce_splits_kernel` merges
them: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), m = max_s lse_s.

The context attended to is [kv_lo, seq_len) with kv_lo = max(0, seq_len - sliding_window);
partitions cover that range, so a sliding window never spends programs outside it.
"""

import triton
import triton.language as tl

from brim.kernels.paged_tiles import cast_rtne, kv_tile_offsets, load_tile


@triton.jit
def _decode_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]; written when NUM_SPLITS == 1
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD] f32; NUM_SPLITS > 1
    partial_lse_ptr,  # [num_seqs, num_heads, NUM_SPLITS] f32, log2-sum-exp2; NUM_SPLITS > 1
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides as k_cache
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32; one query per sequence
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,  # softmax scale * log2(e) (* k_scale for FP8): scores are kept in base 2
    v_scale,  # FP8 cache: the V scale, applied to the output (1.0 otherwise)
    sliding_window,  # tokens; a huge value when there is none
    partition_size,  # tokens per split, a multiple of BLOCK_N
    stride_q_t, stride_q_h, stride_q_d,
    stride_out_t, stride_out_h, stride_out_d,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    stride_block_tables,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 and a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,  # context positions per tile
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,  # compute dots in float32 (float32 inputs, or the interpreter)
    FP8_KV: tl.constexpr,  # the caches hold e4m3fn bit patterns (uint8)
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    token = tl.load(query_start_loc_ptr + seq + 1) - 1  # the sequence's only (last) query
    kv_lo = tl.maximum(seq_len - sliding_window, 0)
    # Partitions start on a tile boundary; positions below kv_lo are masked.
    part_lo = (kv_lo // BLOCK_N) * BLOCK_N + split * partition_size
    part_hi = tl.minimum(part_lo + partition_size, seq_len)

    rows = tl.arange(0, GROUP_PAD)  # query head within the group
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < GROUP
    q = tl.load(q_ptr + token.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h
                + dims[None, :] * stride_q_d,
                mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Online softmax; -1e30 rather than -inf keeps 2^(m_old - m_new) finite on empty rows.
    m_i = tl.full([GROUP_PAD], -1e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq * stride_block_tables
    for tile_lo in tl.range(part_lo, part_hi, BLOCK_N):
        positions = tile_lo + tl.arange(0, BLOCK_N)
        is_used = (positions >= kv_lo) & (positions < part_hi)
        offsets, mask = kv_tile_offsets(
            block_table_ptr, positions, is_used, kv_head,
            stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
            BLOCK_SIZE=BLOCK_SIZE, HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD)
        k = load_tile(k_cache_ptr, offsets, mask, UPCAST=UPCAST, FP8=FP8_KV)  # [BLOCK_N, D]
        v = load_tile(v_cache_ptr, offsets, mask, UPCAST=UPCAST, FP8=FP8_KV)
        if FP8_KV:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GROUP_PAD, N]
        scores = tl.where(is_used[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # l_i == 0 only for padded rows and empty partitions.
    has_mass = l_i > 0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None] * v_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token.to(tl.int64) * stride_out_t + heads[:, None] * stride_out_h
                 + dims[None, :] * stride_out_d,
                 cast_rtne(out, out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (dims[None, :] < HEAD_DIM))
    else:
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        # [seq, head, split] of a contiguous [num_seqs, num_heads, NUM_SPLITS] tensor
        stat = (seq * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(partial_lse_ptr + stat, lse, mask=row_mask)
        tl.store(partial_out_ptr + stat[:, None].to(tl.int64) * HEAD_DIM_PAD + dims[None, :],
                 out, mask=row_mask[:, None])


@triton.jit
def _reduce_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD] f32
    partial_lse_ptr,  # [num_seqs, num_heads, NUM_SPLITS] f32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    stride_out_t, stride_out_h, stride_out_d,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_PAD: tl.constexpr,  # next power of two of NUM_SPLITS
):
    """Grid (num_seqs, num_heads): merge a head's partitions by their log-sum-exp."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq + 1) - 1
    splits = tl.arange(0, NUM_SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    stat = (seq * tl.num_programs(1) + head).to(tl.int64) * NUM_SPLITS + splits
    lse = tl.load(partial_lse_ptr + stat, mask=splits < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    # Empty partitions (lse = -inf) weigh 0; their partial output is never read.
    has_mass = lse > float("-inf")
    weights = tl.where(has_mass, tl.exp2(lse - m), 0.0)  # [NUM_SPLITS_PAD]
    partial = tl.load(partial_out_ptr + stat[:, None] * HEAD_DIM_PAD + dims[None, :],
                      mask=has_mass[:, None], other=0.0)  # [NUM_SPLITS_PAD, HEAD_DIM_PAD]
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_out_t + head * stride_out_h
             + dims * stride_out_d,
             cast_rtne(out, out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
