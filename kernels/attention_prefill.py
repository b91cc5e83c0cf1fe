"""Varlen attention over the paged context: prefill, chunked prefill and mixed batches.

Grid (num_tokens // BLOCK_Q + num_seqs, num_kv_heads). Each program takes BLOCK_Q query
tokens of one sequence and all GROUP query heads of one KV head: its BLOCK_M =
BLOCK_Q * GROUP_PAD rows are (token, head-in-group) pairs, so every K/V tile is read once
for the whole group. It walks the context in BLOCK_N tiles with an online softmax,
visiting only tiles that some row may attend to: [first_pos - window + 1, last_pos].

The host does not know how many query blocks each sequence has without reading
query_start_loc back from the device, so the grid is an upper bound: sequence i owns the
program ids starting at query_start_loc[i] // BLOCK_Q + i (at least ceil(len_i / BLOCK_Q)
of them), a program finds its sequence by binary search and leaves if it has no tokens.
"""

import triton
import triton.language as tl

from brim.kernels.paged_tiles import cast_rtne, kv_tile_offsets, load_tile


@triton.jit
def _prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides as k_cache
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    num_seqs,
    qk_scale,  # softmax scale * log2(e) (* k_scale for FP8): scores are kept in base 2
    v_scale,  # FP8 cache: the V scale, applied to the output (1.0 otherwise)
    sliding_window,  # tokens; a huge value when there is none
    stride_q_t, stride_q_h, stride_q_d,
    stride_out_t, stride_out_h, stride_out_d,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    stride_block_tables,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # next power of two of GROUP
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * GROUP_PAD >= 16
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,  # context positions per tile
    UPCAST: tl.constexpr,  # compute dots in float32 (float32 inputs, or the interpreter)
    FP8_KV: tl.constexpr,  # the caches hold e4m3fn bit patterns (uint8)
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Last sequence whose first program id is <= pid.
    lo = 0
    hi = num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid
        else:
            hi = mid
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    q_tok = q_block * BLOCK_Q + rows // GROUP_PAD  # token index within the sequence
    heads = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (q_tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = seq_len - q_len + q_tok  # context position of each row's query
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims[None, :] < HEAD_DIM

    token_offsets = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + token_offsets[:, None] * stride_q_t + heads[:, None] * stride_q_h
                + dims[None, :] * stride_q_d,
                mask=row_mask[:, None] & dim_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Context positions any row of this block may see.
    first_pos = seq_len - q_len + q_block * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    kv_lo = tl.maximum(first_pos - sliding_window + 1, 0)
    kv_hi = last_pos + 1

    # -1e30 rather than -inf keeps 2^(m_old - m_new) finite on fully masked rows.
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq * stride_block_tables

    # Three runs of tiles over [start, kv_hi): tiles every row sees whole (causal: at or
    # below first_pos; window: not below last_pos - window + 1) skip the masks; the tiles
    # before them (window edge) and after them (diagonal) are masked per row.
    start = (kv_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(tl.cdiv(tl.maximum(last_pos - sliding_window + 1, 0), BLOCK_N)
                         * BLOCK_N, start)
    full_hi = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, full_lo)
    for tile_lo in tl.range(start, tl.minimum(full_lo, kv_hi), BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            m_i, l_i, acc, q, q_pos, tile_lo, kv_lo, kv_hi, sliding_window, qk_scale,
            block_table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
            stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
            MASKED=True, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            HEAD_DIM_PAD=HEAD_DIM_PAD, UPCAST=UPCAST, FP8_KV=FP8_KV)
    for tile_lo in tl.range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            m_i, l_i, acc, q, q_pos, tile_lo, kv_lo, kv_hi, sliding_window, qk_scale,
            block_table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
            stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
            MASKED=False, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            HEAD_DIM_PAD=HEAD_DIM_PAD, UPCAST=UPCAST, FP8_KV=FP8_KV)
    for tile_lo in tl.range(full_hi, kv_hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            m_i, l_i, acc, q, q_pos, tile_lo, kv_lo, kv_hi, sliding_window, qk_scale,
            block_table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
            stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
            MASKED=True, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
            HEAD_DIM_PAD=HEAD_DIM_PAD, UPCAST=UPCAST, FP8_KV=FP8_KV)

    # Every real row attends at least to itself; l_i == 0 only on padded rows.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(out_ptr + token_offsets[:, None] * stride_out_t + heads[:, None] * stride_out_h
             + dims[None, :] * stride_out_d,
             cast_rtne(out, out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask)


@triton.jit
def _attend_tile(
    m_i, l_i, acc, q, q_pos, tile_lo, kv_lo, kv_hi, sliding_window, qk_scale,
    block_table_ptr, k_cache_ptr, v_cache_ptr, kv_head,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    MASKED: tl.constexpr,  # False: every row sees every position of the tile
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    """One online-softmax step over the BLOCK_N context positions from tile_lo."""
    positions = tile_lo + tl.arange(0, BLOCK_N)
    is_loaded = (positions >= kv_lo) & (positions < kv_hi)
    offsets, mask = kv_tile_offsets(
        block_table_ptr, positions, is_loaded, kv_head,
        stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
        BLOCK_SIZE=BLOCK_SIZE, HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, MASKED=MASKED)
    # Unmasked loads need the mask constant along head_dim (HEAD_DIM a power of two).
    UNMASKED_LOAD: tl.constexpr = not MASKED and HEAD_DIM == HEAD_DIM_PAD
    k = load_tile(k_cache_ptr, offsets, mask, UPCAST=UPCAST, MASKED=not UNMASKED_LOAD,
                  FP8=FP8_KV)
    v = load_tile(v_cache_ptr, offsets, mask, UPCAST=UPCAST, MASKED=not UNMASKED_LOAD,
                  FP8=FP8_KV)
    if FP8_KV:
        k = k.to(q.dtype)
        v = v.to(q.dtype)

    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, N]
    if MASKED:
        # Causal and sliding window, per row: q_pos - window < position <= q_pos.
        allowed = ((positions[None, :] <= q_pos[:, None])
                   & (positions[None, :] > q_pos[:, None] - sliding_window)
                   & is_loaded[None, :])
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc
