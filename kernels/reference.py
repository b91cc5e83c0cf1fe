"""Torch reference implementations of the paged-attention contract, written for clarity.

KV-cache layout (shared with the engine): per layer `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]. Token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size.

These run the engine on CPU and are what the Triton kernels are tested against.
"""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; block_id * block_size + offset, -1 = skip
) -> None:
    """Write each token's K and V into its slot; slot -1 (padding) is skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_blocks, block_size = k_cache.shape[:2]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat[slots] = key[valid].to(k_cache.dtype)
    v_flat[slots] = value[valid].to(v_cache.dtype)


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
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    Sequence i's queries q[query_start_loc[i]:query_start_loc[i+1]] are the last
    positions of its seq_lens[i]-token context. A query at position p attends to
    positions max(0, p - sliding_window + 1) .. p. Accumulates in float32.
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_seqs = len(lens)
    query_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]

    # Decode (one query per sequence) is the common case: do those sequences in one
    # batched pass over a padded gather of their blocks.
    decode = [i for i in range(num_seqs) if query_lens[i] == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        tokens = query_start_loc[:-1].long()[idx]
        ctx = seq_lens.long()[idx]  # [D]
        max_ctx = int(ctx.max())
        num_blocks_needed = -(-max_ctx // k_cache.shape[1])
        tables = block_tables[idx, :num_blocks_needed].long()  # [D, nb]
        k = k_cache[tables].flatten(1, 2)[:, :max_ctx].float()  # [D, L, kvh, d]
        v = v_cache[tables].flatten(1, 2)[:, :max_ctx].float()
        qd = q[tokens].float().view(len(decode), num_kv_heads, group, head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", qd, k) * scale  # [D, kvh, g, L]
        pos = torch.arange(max_ctx, device=q.device)
        allowed = pos[None, :] < ctx[:, None]  # [D, L]
        if sliding_window is not None:
            allowed &= pos[None, :] > (ctx[:, None] - 1 - sliding_window)
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        # Masked slots may hold stale values from earlier requests: zero them so that a
        # zero weight times a non-finite value cannot poison the sum.
        v = v.masked_fill(~allowed[:, :, None, None], 0.0)
        o = torch.einsum("bhgl,blhd->bhgd", probs, v)
        out[tokens] = o.reshape(len(decode), num_heads, head_dim).to(q.dtype)

    for i in range(num_seqs):
        if query_lens[i] == 1 or query_lens[i] == 0:
            continue
        out[starts[i] : starts[i + 1]] = _attend_one(
            q[starts[i] : starts[i + 1]],
            k_cache,
            v_cache,
            block_tables[i],
            lens[i],
            scale,
            sliding_window,
        ).to(q.dtype)
    return out


def _attend_one(q, k_cache, v_cache, block_table, seq_len, scale, sliding_window):
    """One sequence: q [q_len, h, d] are positions seq_len - q_len .. seq_len - 1."""
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-seq_len // block_size)
    table = block_table[:num_blocks].long()
    k = k_cache[table].flatten(0, 1)[:seq_len].float()  # [L, kvh, d]
    v = v_cache[table].flatten(0, 1)[:seq_len].float()
    qg = q.float().view(q_len, num_kv_heads, group, head_dim)
    scores = torch.einsum("qhgd,lhd->hgql", qg, k) * scale  # [kvh, g, q, L]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("hgql,lhd->qhgd", scores.softmax(dim=-1), v)
    return o.reshape(q_len, num_heads, head_dim)
