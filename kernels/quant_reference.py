"""Torch reference of the quantized matmul: brim's packed-integer weight layout, unpacked.

The layout (shared with `quant_matmul_triton.py`; GPTQ and AWQ checkpoints are converted to
it at load, see docs/kernels.md):

    qweight  int32 [K / PACK, N]   row k of W^T in word k // PACK, bits (k % PACK) * BITS
    qzeros   int32 [G, N / PACK]   zero of (group g, column n) in word n // PACK,
                                   bits (n % PACK) * BITS
    scales   float [G, N]          scale of (group g, column n)
    perm     int32 [K] or None     act-order: the kernel's row k reads input feature perm[k]

with PACK = 32 // BITS, G = ceil(K / GROUP_SIZE), and row k in group k // GROUP_SIZE:

    y[m, n] = sum_k x[m, perm[k]] * (q[k, n] - z[k // GROUP_SIZE, n]) * s[k // GROUP_SIZE, n]

These run the engine's quantized layers on CPU and are what the Triton kernel is tested
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / PACK, C] -> int32 [R, C]: value r of a column from word r // PACK."""
    words, cols = packed.shape
    values = (packed[:, None, :] >> _shifts(bits, packed.device)[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(words * (32 // bits), cols)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R, C] (0 <= v < 2^bits, R a multiple of PACK) -> int32 [R / PACK, C]."""
    pack = 32 // bits
    rows, cols = values.shape
    shifts = _shifts(bits, values.device).long()[None, :, None]
    shifted = values.long().reshape(rows // pack, pack, cols) << shifts
    return _to_int32(shifted.sum(1))


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / PACK] -> int32 [R, C]: column c from word c // PACK."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [R, C] -> int32 [R, C / PACK]."""
    return pack_rows(values.t(), bits).t().contiguous()


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """W^T [K, N] in float32, rows in qweight's (permuted) order."""
    q = unpack_rows(qweight, bits).float()  # [K, N]; small integers, exact in float32
    z = unpack_cols(qzeros, bits).float()  # [G, N]
    num_rows, num_cols = q.shape
    num_groups = z.shape[0]
    padding = num_groups * group_size - num_rows  # a partial last group
    if padding:
        q = F.pad(q, (0, 0, 0, padding))
    # (q - z) * s per group, broadcast over the group's rows (no [K, N] gathers)
    w = q.view(num_groups, group_size, num_cols).sub_(z[:, None, :])
    w = w.mul_(scales.float()[:, None, :])
    return w.view(num_groups * group_size, num_cols)[:num_rows]


def quant_matmul_ref(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / PACK, N]
    qzeros: torch.Tensor,  # int32 [G, N / PACK]
    scales: torch.Tensor,  # [G, N]
    perm: torch.Tensor | None,  # int32 [K] or None
    *,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """y = x W^T + bias, [M, N] in x's dtype: the weight dequantized (float32, then x's
    dtype) and multiplied by torch."""
    if perm is not None:
        x = x.index_select(-1, perm)
    weight_t = dequantize(qweight, qzeros, scales, bits, group_size).to(x.dtype)
    return F.linear(x, weight_t.t(), bias)
