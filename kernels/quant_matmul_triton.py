"""Triton matmul with 4/8-bit weights dequantized on the fly (W4A16 / W8A16).

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)). A program computes a [BLOCK_M, BLOCK_N] tile of
y = x W^T: for each BLOCK_K slice of the input it loads the packed words that hold those
rows (each int32 word holds PACK = 32 // BITS consecutive rows of one column), shifts and
masks out the integers, subtracts the group's zero, multiplies by the group's scale, and
feeds the dequantized tile to tl.dot. The weight never exists dequantized in memory.

Layout and the formula: `quant_reference.py`. Act-order (`perm`)
is applied by the launcher as one gather of x's columns, so the kernel always reads groups
of consecutive rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from brim.kernels.launch import Launch
from brim.kernels.paged_tiles import cast_rtne


@triton.jit
def _quant_matmul_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K]
    qweight_ptr,  # int32 [K / PACK, N]
    qzeros_ptr,  # int32 [G, N / PACK]
    scales_ptr,  # [G, N]
    bias_ptr,  # [N]; unused unless HAS_BIAS
    M, N, K,
    stride_x_m, stride_x_k,
    stride_out_m, stride_out_n,
    stride_qw_k, stride_qw_n,
    stride_qz_g, stride_qz_n,
    stride_s_g, stride_s_n,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # rows per group (K for one group per column)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in float32 (float32 inputs, or the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    # The zero of column n sits in word n // PACK at bit (n % PACK) * BITS.
    zero_shift = ((cols % PACK) * BITS)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_lo in tl.range(0, K, BLOCK_K):
        ks = k_lo + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x_m + ks[None, :] * stride_x_k,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w_mask = k_mask[:, None] & col_mask[None, :]
        words = tl.load(qweight_ptr + (ks // PACK)[:, None].to(tl.int64) * stride_qw_k
                        + cols[None, :] * stride_qw_n, mask=w_mask, other=0)
        q = (words >> ((ks % PACK) * BITS)[:, None]) & MASK  # [BLOCK_K, BLOCK_N]
        groups = (ks // GROUP_SIZE)[:, None]
        zero_words = tl.load(qzeros_ptr + groups * stride_qz_g + (cols // PACK)[None, :]
                             * stride_qz_n, mask=w_mask, other=0)
        zeros = (zero_words >> zero_shift) & MASK
        scales = tl.load(scales_ptr + groups * stride_s_g + cols[None, :] * stride_s_n,
                         mask=w_mask, other=0.0).to(tl.float32)
        # [BLOCK_K, BLOCK_N], 0 where masked; rounded to x's dtype as the reference does
        w = cast_rtne((q - zeros).to(tl.float32) * scales, x_ptr.dtype.element_ty)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out_m + cols[None, :] * stride_out_n,
             cast_rtne(acc, out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _block_m(num_rows: int) -> int:
    """16 for decode batches (tl.dot's least), up to 64 for prefill."""
    return min(64, max(16, triton.next_power_of_2(num_rows)))


def plan_quant_matmul(x, qweight, qzeros, scales, bias, out, *, bits: int, group_size: int,
                      block_n: int = 64, block_k: int = 64) -> list[Launch]:
    """The launch computing out = x W^T (+ bias), without running it; x already permuted."""
    num_rows, in_features = x.shape
    out_features = scales.shape[1]
    pack = 32 // bits
    if qweight.shape != (in_features // pack, out_features) or in_features % pack:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not hold a {in_features} x "
                         f"{out_features} {bits}-bit weight (expected "
                         f"{(in_features // pack, out_features)})")
    if num_rows == 0:
        return []
    block_m = _block_m(num_rows)
    interpreted = not x.is_cuda
    return [Launch(kernel=_quant_matmul_kernel,
                   grid=(triton.cdiv(num_rows, block_m), triton.cdiv(out_features, block_n)),
                   kwargs={
        "out_ptr": out, "x_ptr": x, "qweight_ptr": qweight, "qzeros_ptr": qzeros,
        "scales_ptr": scales,
        "bias_ptr": bias if bias is not None else scales,
        "M": num_rows, "N": out_features, "K": in_features,
        "stride_x_m": x.stride(0), "stride_x_k": x.stride(1),
        "stride_out_m": out.stride(0), "stride_out_n": out.stride(1),
        "stride_qw_k": qweight.stride(0), "stride_qw_n": qweight.stride(1),
        "stride_qz_g": qzeros.stride(0), "stride_qz_n": qzeros.stride(1),
        "stride_s_g": scales.stride(0), "stride_s_n": scales.stride(1),
        "BITS": bits, "GROUP_SIZE": group_size, "HAS_BIAS": bias is not None,
        "UPCAST": interpreted or x.dtype == torch.float32,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "num_warps": 4, "num_stages": 3,
    })]


def quant_matmul_triton(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / PACK, N]
    qzeros: torch.Tensor,  # int32 [G, N / PACK]
    scales: torch.Tensor,  # [G, N]
    perm: torch.Tensor | None,  # int32 [K] or None
    *,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """y = x W^T + bias: [M, N] in x's dtype (contract: quant_reference.quant_matmul_ref)."""
    if perm is not None:
        x = x.index_select(-1, perm)
    out = torch.empty(x.shape[0], scales.shape[1], dtype=x.dtype, device=x.device)
    for launch in plan_quant_matmul(x, qweight, qzeros, scales, bias, out, bits=bits,
                                    group_size=group_size, block_n=block_n, block_k=block_k):
        launch.run()
    return out
