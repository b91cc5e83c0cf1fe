"""Torch reference implementations of the paged-attention contract, written for clarity.

KV-cache layout (shared with the engine): per layer `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]. Token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size.

An FP8 cache (float8_e4m3fn) stores key / k_scale and value / v_scale, rounded to nearest
even and saturated at +-448; attention reads k_scale x cache (per layer scales, 1.0 when the
checkpoint has none). Caches of other dtypes ignore the scales.

These run the engine on CPU and are what the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as the cache stores it: FP8 x / scale (saturated), other dtypes converted."""
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def store_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; block_id * block_size + offset, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K and V into its slot; slot -1 (padding) is skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_blocks, block_size = k_cache.shape[:2]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat[slots] = quantize_kv(key[valid], k_cache.dtype, k_scale)
    v_flat[slots] = quantize_kv(value[valid], v_cache.dtype, v_scale)


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the queries
    scale: float,
    *,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    Sequence i's queries q[query_start_loc[i]:query_start_loc[i+1]] are the last
    positions of its seq_lens[i]-token context. A query at position p attends to
    positions max(0, p - sliding_window + 1) .. p. Computes in float32.
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if is_fp8_cache(k_cache):  # dequantize: the computation below reads float32 anyway
        k_cache = k_cache.float() * k_scale
        v_cache = v_cache.float() * v_scale
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    query_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]

    # Decode (one query per sequence) is the common case: those sequences go through batched
    # attention over a padded gather of their blocks, one batch per group of similar
    # context lengths so that little of what is gathered is padding.
    decode = sorted((i for i, n in enumerate(query_lens) if n == 1), key=lambda i: lens[i])
    for group in _similar_lengths(decode, lens):
        idx = torch.tensor(group, device=q.device)
        tokens = query_start_loc[:-1].long()[idx]
        out[tokens] = _decode_batch(q[tokens], k_cache, v_cache, block_tables[idx],
                                    seq_lens[idx], scale, sliding_window).to(q.dtype)
    for i, n in enumerate(query_lens):
        if n > 1:
            out[starts[i] : starts[i + 1]] = _attend_one(
                q[starts[i] : starts[i + 1]], k_cache, v_cache, block_tables[i], lens[i],
                scale, sliding_window,
            ).to(q.dtype)
    return out


def _similar_lengths(order: list[int], lens: list[int], slack: int = 64) -> list[list[int]]:
    """Split sequence ids sorted by length into runs whose longest is at most 1.5x the
    shortest plus `slack` tokens."""
    groups: list[list[int]] = []
    for i in order:
        if groups and lens[i] <= 1.5 * lens[groups[-1][0]] + slack:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of a sequence (or a batch of them): [..., length, kvh, d]."""
    num_blocks = -(-length // cache.shape[1])
    ids = block_table[..., :num_blocks].long()
    # index_select on the flat id list: ~3x faster on CPU than advanced indexing cache[ids].
    blocks = cache.index_select(0, ids.reshape(-1)).view(*ids.shape, *cache.shape[1:])
    return blocks.flatten(-4, -3)[..., :length, :, :].float()  # [..., length, kvh, d]


def _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window):
    """q [D, h, d], one query per sequence at position seq_len - 1."""
    ctx = seq_lens.long()
    max_ctx = int(ctx.max())
    k = _gather(k_cache, block_tables, max_ctx)  # [D, L, kvh, d], padded to the longest
    v = _gather(v_cache, block_tables, max_ctx)
    pos = torch.arange(max_ctx, device=q.device)
    allowed = pos[None, :] < ctx[:, None]  # [D, L]
    if sliding_window is not None:
        allowed &= pos[None, :] > ctx[:, None] - 1 - sliding_window
    # Padding slots may hold anything (stale or never-written values): zero them so that
    # a masked-out non-finite value cannot poison the sum. Slices per sequence touch only
    # the padding (a broadcast masked_fill would rewrite every gathered element).
    lows = (ctx - sliding_window).clamp(min=0).tolist() if sliding_window is not None else None
    for row, length in enumerate(ctx.tolist()):
        k[row, length:] = 0.0
        v[row, length:] = 0.0
        if lows is not None and lows[row] > 0:
            k[row, :lows[row]] = 0.0
            v[row, :lows[row]] = 0.0
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None, :],  # [D, h, 1, d]
        k.transpose(1, 2),  # [D, kvh, L, d]
        v.transpose(1, 2),
        attn_mask=allowed[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o[:, :, 0]


def _attend_one(q, k_cache, v_cache, block_table, seq_len, scale, sliding_window):
    """One sequence: q [q_len, h, d] are positions seq_len - q_len .. seq_len - 1."""
    q_len = q.shape[0]
    k = _gather(k_cache, block_table, seq_len).transpose(0, 1)  # [kvh, L, d]
    v = _gather(v_cache, block_table, seq_len).transpose(0, 1)
    if q_len == seq_len and sliding_window is None:
        mask, is_causal = None, True  # plain causal prefill: SDPA's fastest path
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        is_causal = False
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=True,
    )
    return o.transpose(0, 1)  # [q_len, h, d]
