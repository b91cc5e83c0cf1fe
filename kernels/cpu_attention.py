"""Paged attention on CPU, with the per-step bookkeeping done once per step, not per layer.

Decodes go through the C++ kernel (cpu_decode.py) when it is built: one call per layer for all
decoding sequences, reading K and V where they lie in the paged cache. Prefill chunks (and
speculative verification, any sequence with several queries) likewise go through
cpu_prefill_attention.cpp, one call per layer for all of them, where it has a path for the
inputs (AVX-512, head size 64 or 128, the cache in q's dtype). What follows is the path
without them.

The computation is the torch reference's (`reference.py`: decodes batched by similar context
length over a padded gather, SDPA; prefills one sequence at a time), and the results are
equal element for element. What moves out of the per-layer path is everything that depends
only on the step's block tables and lengths — the grouping, the flat block ids to gather,
the masks — which `CpuAttentionPlan.build` computes once and every layer reuses (30 layers:
30x less Python per step).

One thing differs from the reference's contract: the reference zeroes the gathered padding
because a stale slot may hold anything, and 0 x NaN would poison the sum even where the mask
gives a weight of 0. Here the cache is kept finite instead — `store_kv_cpu` writes
non-finite values as 0, and the engine's caches start zeroed — so masked slots contribute
exactly 0 without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from brim.kernels.cpu_decode import decode_attention_op, prefill_attention_op, store_kv_op
from brim.kernels.reference import _similar_lengths, is_fp8_cache, quantize_kv


@dataclass(slots=True)
class DecodeGroup:
    """Decoding sequences of similar length, attended together over a padded gather.

    tokens: [D] rows of q (one query per sequence).
    block_ids: [D * blocks] physical blocks to gather, row-major.
    lengths: [D] context lengths (the padded gather holds max(lengths) tokens per row).
    """

    tokens: torch.Tensor
    block_ids: torch.Tensor
    num_blocks: int
    lengths: torch.Tensor
    max_length: int
    masks: dict = field(default_factory=dict)  # sliding window (None: global) -> mask


@dataclass(slots=True)
class DecodeBatch:
    """Every decoding sequence of the step, for the in-place C++ kernel (cpu_decode.py).

    rows: [D] int64 rows of q; tables: [D, max_blocks] int32 block tables; lengths: [D]
    int64 context lengths.
    """

    rows: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor


@dataclass(slots=True)
class Prefill:
    """One sequence with several queries: positions seq_len - (end - start) .. seq_len - 1."""

    start: int
    end: int
    block_ids: torch.Tensor
    seq_len: int
    masks: dict = field(default_factory=dict)  # sliding window -> (mask or None, is_causal)


@dataclass(slots=True)
class PrefillBatch:
    """Every prefill chunk of the step, for the in-place C++ kernel
    (cpu_prefill_attention.cpp): tables [P, max_blocks] int32; q_starts, q_lens, seq_lens
    [P] int64 (the chunk's first row of q, its length, the context length with it)."""

    tables: torch.Tensor
    q_starts: torch.Tensor
    q_lens: torch.Tensor
    seq_lens: torch.Tensor


@dataclass(slots=True)
class CpuAttentionPlan:
    """Where each of a step's sequences reads its context, for every layer of the step."""

    block_size: int
    decode_groups: list[DecodeGroup]
    prefills: list[Prefill]
    # Set when the C++ kernels read the cache in place: all decodes, and no decode_groups;
    # all prefills (`prefills` stays, for what the kernel has no path for: it says so).
    decodes: DecodeBatch | None = None
    prefill_batch: PrefillBatch | None = None

    @classmethod
    def build(cls, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, block_size: int,
              in_place: bool | None = None) -> "CpuAttentionPlan":
        """block_tables [num_seqs, max_blocks] int32, query_start_loc [num_seqs + 1],
        seq_lens [num_seqs] (context length including this step's queries).

        in_place: decodes through the C++ kernel (cpu_decode.py); None: when it is built.
        """
        if in_place is None:
            in_place = decode_attention_op() is not None
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        query_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]
        tables = block_tables.long()
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        prefills = [Prefill(start=starts[i], end=starts[i + 1],
                            block_ids=tables[i, :-(-lens[i] // block_size)], seq_len=lens[i])
                    for i, n in enumerate(query_lens) if n > 1]
        if in_place:
            idx = torch.tensor(decode, dtype=torch.long)
            batch = DecodeBatch(rows=query_start_loc[:-1].long()[idx],
                                tables=block_tables[idx].to(torch.int32).contiguous(),
                                lengths=seq_lens[idx].long())
            prefill_batch = None
            if prefills:
                rows = [i for i, n in enumerate(query_lens) if n > 1]
                prefill_batch = PrefillBatch(
                    tables=block_tables[rows].to(torch.int32).contiguous(),
                    q_starts=torch.tensor([starts[i] for i in rows], dtype=torch.long),
                    q_lens=torch.tensor([query_lens[i] for i in rows], dtype=torch.long),
                    seq_lens=torch.tensor([lens[i] for i in rows], dtype=torch.long))
            return cls(block_size, [], prefills, batch, prefill_batch)
        decode.sort(key=lambda i: lens[i])
        groups = []
        for group in _similar_lengths(decode, lens):
            idx = torch.tensor(group)
            lengths = seq_lens[idx].long()
            max_length = max(lens[i] for i in group)
            num_blocks = -(-max_length // block_size)
            groups.append(DecodeGroup(
                tokens=query_start_loc[:-1].long()[idx],
                block_ids=tables[idx, :num_blocks].reshape(-1), num_blocks=num_blocks,
                lengths=lengths, max_length=max_length))
        return cls(block_size, groups, prefills)


def _gather_raw(cache: torch.Tensor, block_ids: torch.Tensor, rows: int,
                num_blocks: int) -> torch.Tensor:
    """[rows, num_blocks * block_size, kvh, d] in the cache's dtype, from the flat block ids."""
    return cache.index_select(0, block_ids).view(rows, num_blocks * cache.shape[1],
                                                 *cache.shape[2:])


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, rows: int,
            num_blocks: int) -> torch.Tensor:
    """[rows, num_blocks * block_size, kvh, d] float32, contiguous, from the flat block ids."""
    blocks = cache.index_select(0, block_ids).view(rows, num_blocks * cache.shape[1],
                                                   *cache.shape[2:])
    return blocks.float()


def _decode_mask(group: DecodeGroup, window: int | None) -> torch.Tensor:
    """[D, 1, 1, L]: which of the gathered positions each sequence's query sees."""
    mask = group.masks.get(window)
    if mask is None:
        ctx = group.lengths
        pos = torch.arange(group.max_length)
        allowed = pos[None, :] < ctx[:, None]  # [D, L]
        if window is not None:
            allowed &= pos[None, :] > ctx[:, None] - 1 - window
        mask = group.masks[window] = allowed[:, None, None, :]
    return mask


def _prefill_mask(p: Prefill, window: int | None, q_len: int):
    masks = p.masks.get(window)
    if masks is None:
        if q_len == p.seq_len and window is None:
            masks = (None, True)
        else:
            q_pos = torch.arange(p.seq_len - q_len, p.seq_len)[:, None]
            k_pos = torch.arange(p.seq_len)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            masks = (mask, False)
        p.masks[window] = masks
    return masks


def paged_attention_cpu(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: CpuAttentionPlan,
    scale: float,
    *,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """paged_attention_ref's contract, with the step's bookkeeping taken from `plan`, on a
    cache that holds only finite values (see the module's docstring).

    An FP8 cache is read in the query's dtype (exact), its K scale folded into the softmax
    scale and its V scale applied to the output.
    """
    fp8 = is_fp8_cache(k_cache)
    if fp8:
        out = paged_attention_cpu(q, _Fp8View(k_cache, q.dtype), _Fp8View(v_cache, q.dtype),
                                  plan, scale * k_scale, sliding_window=sliding_window)
        return out if v_scale == 1.0 else (out.float() * v_scale).to(q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if plan.decodes is not None and len(plan.decodes.rows):
        d = plan.decodes
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        # An FP8 cache goes in as its bytes (the kernel widens each element); the K scale
        # is in `scale` already, the V scale applied by the caller.
        k_raw = k_cache.cache if isinstance(k_cache, _Fp8View) else k_cache
        v_raw = v_cache.cache if isinstance(v_cache, _Fp8View) else v_cache
        decode_attention_op()(q, k_raw, v_raw, d.rows, d.tables, d.lengths, scale,
                              sliding_window or 0, out)
    for group in plan.decode_groups:
        rows, length = len(group.tokens), group.max_length
        mask = _decode_mask(group, sliding_window)
        if q.dtype == torch.float32:
            k = _gather(k_cache, group.block_ids, rows, group.num_blocks)[:, :length]
            v = _gather(v_cache, group.block_ids, rows, group.num_blocks)[:, :length]
            o = F.scaled_dot_product_attention(
                q[group.tokens][:, :, None, :],  # [D, h, 1, d]
                k.transpose(1, 2), v.transpose(1, 2),  # [D, kvh, L, d]
                attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]
        else:
            # 16-bit: no float32 copies; SDPA accumulates in float32 itself. The GQA group
            # becomes the query rows of its KV head ([D, kvh, group, d]), so K and V are not
            # repeated per query head (enable_gqa's path is 4-5x slower here in bfloat16).
            k = _gather_raw(k_cache, group.block_ids, rows, group.num_blocks)[:, :length]
            v = _gather_raw(v_cache, group.block_ids, rows, group.num_blocks)[:, :length]
            o = F.scaled_dot_product_attention(
                q[group.tokens].view(rows, num_kv_heads, -1, head_dim),
                k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
            o = o.reshape(rows, -1, head_dim)
        out[group.tokens] = o.to(q.dtype)
    prefills = plan.prefills
    if plan.prefill_batch is not None and not isinstance(k_cache, _Fp8View):
        b = plan.prefill_batch
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        if prefill_attention_op()(q, k_cache, v_cache, b.tables, b.q_starts, b.q_lens,
                                  b.seq_lens, scale, sliding_window or 0, out):
            prefills = []  # done in place; else (no path for these inputs) SDPA below
    for p in prefills:
        q_len = p.end - p.start
        num_blocks = len(p.block_ids)
        k = _gather(k_cache, p.block_ids, 1, num_blocks)[0, :p.seq_len].transpose(0, 1)
        v = _gather(v_cache, p.block_ids, 1, num_blocks)[0, :p.seq_len].transpose(0, 1)
        mask, is_causal = _prefill_mask(p, sliding_window, q_len)
        # 4-D ([1, h, q_len, d]): SDPA's CPU flash kernel takes only 4-D inputs; 3-D ones
        # fall back to the math path (the full score matrix, a materialised causal mask),
        # 2x slower at a few hundred tokens.
        o = F.scaled_dot_product_attention(
            q[p.start:p.end].float().transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
            is_causal=is_causal, scale=scale, enable_gqa=True)[0]
        out[p.start:p.end] = o.transpose(0, 1).to(q.dtype)
    return out


def store_kv_cpu(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; block_id * block_size + offset
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K and V into its slot, non-finite values as 0: the cache stays
    finite, which is what lets paged_attention_cpu leave masked slots as they are.

    A cache in the activations' dtype is written by the C++ op (cpu_decode.py), both caches
    in one call; an FP8 cache (scaled, saturated) by the torch ops below."""
    slots = slot_mapping.long()
    store = store_kv_op()
    if (store is not None and k_cache.dtype == key.dtype == value.dtype
            and not is_fp8_cache(k_cache)):
        store(key, value, k_cache, v_cache, slots)
        return
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        x = quantize_kv(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), cache.dtype,
                        scale)
        if is_fp8_cache(cache):  # copied as bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        # index_copy_, not `flat[slots] = x`: the indexed assignment costs ~10 ms per call
        # on a cache of a few hundred MB here, index_copy_ microseconds (slots are unique).
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)


class _Fp8View:
    """An FP8 cache read as `dtype`: index_select gathers the bytes, then converts (exact),
    so only the gathered blocks are ever widened."""

    def __init__(self, cache: torch.Tensor, dtype: torch.dtype) -> None:
        self.cache, self.dtype, self.shape = cache, dtype, cache.shape

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return self.cache.index_select(dim, index).to(self.dtype)
