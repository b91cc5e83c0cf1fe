"""Triton kernel writing new tokens' K and V into the paged KV cache.

One program per new token copies its [num_kv_heads, head_dim] key and value into slot
`slot_mapping[token]` = block_id * block_size + offset. Slot -1 marks padding: the program
stores nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from brim.kernels.launch import Launch
from brim.kernels.paged_tiles import cast_rtne, float_to_e4m3
from brim.kernels.reference import is_fp8_cache


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides as k_cache
    slot_mapping_ptr,  # [num_tokens]; -1 = skip
    k_inv_scale,  # FP8: the cache stores key * k_inv_scale (1 / k_scale)
    v_inv_scale,
    stride_key_t, stride_key_h, stride_key_d,
    stride_value_t, stride_value_h, stride_value_d,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,  # next power of two of NUM_KV_HEADS
    HEAD_DIM_PAD: tl.constexpr,  # next power of two of HEAD_DIM
    FP8_KV: tl.constexpr,  # the caches hold e4m3fn bit patterns (uint8)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # int64: block_id * stride_cache_b passes 2**31 elements on large caches.
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    # The slot test is broadcast to the tile first: the interpreter rejects a mask built
    # from a scalar comparison.
    slots = tl.full([KV_HEADS_PAD, HEAD_DIM_PAD], 0, tl.int64) + slot
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & (slots >= 0)

    cache_offsets = (block_id * stride_cache_b + offset * stride_cache_s
                     + heads * stride_cache_h + dims * stride_cache_d)
    key = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims * stride_key_d,
                  mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h
                    + dims * stride_value_d, mask=mask)
    if FP8_KV:
        key = float_to_e4m3(key.to(tl.float32) * k_inv_scale)
        value = float_to_e4m3(value.to(tl.float32) * v_inv_scale)
    else:
        if key_ptr.dtype.element_ty != k_cache_ptr.dtype.element_ty:
            key = cast_rtne(key.to(tl.float32), k_cache_ptr.dtype.element_ty)
        if value_ptr.dtype.element_ty != v_cache_ptr.dtype.element_ty:
            value = cast_rtne(value.to(tl.float32), v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, value, mask=mask)


def store_kv_triton(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; block_id * block_size + offset, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K and V into its slot; slot -1 (padding) is skipped. An FP8 cache
    stores key / k_scale and value / v_scale (reference: store_kv_ref)."""
    for launch in plan_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
        launch.run()


def plan_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0,
                  v_scale=1.0) -> list[Launch]:
    """The launch writing K and V into the cache, without running it."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} "
                         f"and {v_cache.stride()}")
    if num_tokens == 0:
        return []
    fp8 = is_fp8_cache(k_cache)
    if fp8:  # the kernel writes the bit patterns
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    return [Launch(kernel=_store_kv_kernel, grid=(num_tokens,), kwargs=dict(
        key_ptr=key,
        value_ptr=value,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping,
        k_inv_scale=1.0 / k_scale, v_inv_scale=1.0 / v_scale,
        stride_key_t=key.stride(0), stride_key_h=key.stride(1), stride_key_d=key.stride(2),
        stride_value_t=value.stride(0), stride_value_h=value.stride(1),
        stride_value_d=value.stride(2),
        stride_cache_b=k_cache.stride(0), stride_cache_s=k_cache.stride(1),
        stride_cache_h=k_cache.stride(2), stride_cache_d=k_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        FP8_KV=fp8,
        num_warps=4,
    ))]
