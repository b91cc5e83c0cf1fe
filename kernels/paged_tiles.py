"""Triton helpers shared by the attention kernels: addressing tiles of the paged KV cache.

A tile is BLOCK_N consecutive context positions of one KV head. Position t lives in block
block_table[t // BLOCK_SIZE] at offset t % BLOCK_SIZE, so a tile may span several cache
blocks (BLOCK_N > BLOCK_SIZE) or part of one (BLOCK_N < BLOCK_SIZE); either way each
position is addressed through the block table on its own.
"""

import triton
import triton.language as tl


@triton.jit
def kv_tile_offsets(
    block_table_ptr,  # [max_blocks_per_seq] this sequence's row of block_tables
    positions,  # [BLOCK_N] context positions
    is_loaded,  # [BLOCK_N] which positions to read; others get block 0 and are masked
    kv_head,
    stride_cache_b, stride_cache_s, stride_cache_h, stride_cache_d,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr = True,  # False: the caller knows every position is loaded
):
    """Element offsets [BLOCK_N, HEAD_DIM_PAD] into k_cache / v_cache, and their load mask."""
    if MASKED:
        block_ids = tl.load(block_table_ptr + positions // BLOCK_SIZE, mask=is_loaded, other=0)
    else:
        block_ids = tl.load(block_table_ptr + positions // BLOCK_SIZE)
    block_ids = block_ids.to(tl.int64)  # block_id * stride_cache_b can pass 2**31
    dims = tl.arange(0, HEAD_DIM_PAD)
    offsets = (block_ids[:, None] * stride_cache_b
               + (positions % BLOCK_SIZE)[:, None] * stride_cache_s
               + kv_head * stride_cache_h
               + dims[None, :] * stride_cache_d)
    if HEAD_DIM == HEAD_DIM_PAD:
        mask = is_loaded[:, None]  # constant along dims: keeps loads vectorised
    else:
        mask = is_loaded[:, None] & (dims[None, :] < HEAD_DIM)
    return offsets, mask


@triton.jit
def load_tile(ptr, offsets, mask, UPCAST: tl.constexpr, MASKED: tl.constexpr = True,
              FP8: tl.constexpr = False):
    """Masked load (masked elements are 0, so stale cache contents never reach a sum).

    MASKED=False loads every element (the caller checked they are all in range) when the
    mask is constant along head_dim, i.e. HEAD_DIM is a power of two.
    UPCAST converts to float32 right after the load: the interpreter's 16-bit arithmetic
    is not exact, and float32 inputs take IEEE dots instead.
    FP8: ptr holds e4m3fn bit patterns (uint8); the tile is decoded to float32 (unscaled).
    """
    if MASKED:
        tile = tl.load(ptr + offsets, mask=mask, other=0)
    else:
        tile = tl.load(ptr + offsets)
    if FP8:
        tile = e4m3_to_float(tile)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """float32 x to DTYPE, rounding to nearest even.

    bfloat16 is rounded on the bits here, on every backend: Triton's interpreter truncates
    float32 -> bfloat16 (its rounding mode is not RTNE), and the GPU gets the same result.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)  # now exact in bfloat16
    return x.to(DTYPE)


# -- FP8 (e4m3fn) KV cache: the kernels see the cache as uint8 bit patterns ---------------------
#
# Converted on the bits rather than with `.to(tl.float8e4nv)`: the interpreter's float8
# conversion neither rounds to nearest nor keeps subnormals, and sm_80 has no FP8 converts.
# Integer code gives the same bytes as torch's `.to(torch.float8_e4m3fn)` everywhere.


@triton.jit
def e4m3_to_float(bits):
    """uint8 e4m3fn bit patterns -> float32, exactly (the NaN pattern is never stored)."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 0xF
    mantissa = b & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # 2^-9
    return tl.where((b & 0x80) != 0, -value, value)


@triton.jit
def float_to_e4m3(x):
    """float32 -> uint8 e4m3fn bits, rounding to nearest even and saturating at +-448 (as
    torch's conversion of a clamped value); NaN is written as 0."""
    x = tl.where(x == x, x, 0.0)
    sign = ((x.to(tl.int32, bitcast=True) >> 31) & 1) << 7
    magnitude = tl.minimum(tl.abs(x), 448.0)
    bits = magnitude.to(tl.int32, bitcast=True)
    # Normal (>= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even, and
    # rebias the exponent from 127 to 7.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal: a multiple of 2^-9, rounded to nearest even by adding 1.5 x 2^23.
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    return (tl.where(magnitude < 0.015625, subnormal, normal) | sign).to(tl.uint8)
