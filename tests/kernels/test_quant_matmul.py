"""quant_matmul: the Triton dequant-matmul (interpreted on CPU, compiled on a GPU) against
the torch reference, over bit widths, group sizes, act-order and odd sizes.

The packed inputs are built here from random integers with numpy-free bit arithmetic of
the layout (quant_reference.py's docstring), and the reference is checked once against a
dense matmul of the weight those integers describe.
"""

import pytest
import torch
from brim.kernels import quant_matmul, quant_matmul_ref
from brim.kernels.quant_matmul_triton import quant_matmul_triton

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
ULP = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ints along dim, element i of each run of 32 // bits at bits i * bits."""
    pack_factor = 32 // bits
    v = values.long().movedim(dim, 0)
    v = v.reshape(v.shape[0] // pack_factor, pack_factor, *v.shape[1:])
    words = sum(v[:, i] << (i * bits) for i in range(pack_factor))
    words = torch.where(words >= 2**31, words - 2**32, words).int()
    return words.movedim(0, dim).contiguous()


def make_layer(in_features, out_features, bits, group_size, act_order, dtype):
    gs = in_features if group_size == -1 else group_size
    num_groups = -(-in_features // gs)
    q = torch.randint(0, 2**bits, (in_features, out_features))
    zeros = torch.randint(0, 2**bits, (num_groups, out_features))
    scales = (torch.rand(num_groups, out_features) * 0.05 + 0.01).to(dtype)
    perm = torch.randperm(in_features).int() if act_order else None
    dense = ((q - zeros[torch.arange(in_features) // gs]).float()
             * scales.float()[torch.arange(in_features) // gs])  # W^T [K, N], permuted rows
    return (pack(q, bits, 0), pack(zeros, bits, 1), scales, perm, gs), dense


CASES = [
    # (M, K, N, bits, group_size, act_order)
    (1, 64, 32, 4, 32, False),  # decode, one block
    (7, 96, 40, 4, 32, True),  # odd M and N, K not a multiple of BLOCK_K, act-order
    (5, 80, 24, 8, 16, False),  # 8-bit
    (3, 72, 48, 4, -1, False),  # one group per column
    (17, 64, 56, 8, 24, True),  # groups that straddle BLOCK_K, 8-bit act-order
    (33, 40, 16, 4, 128, False),  # group larger than K: one partial group
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,bits,group_size,act_order", CASES,
                         ids=lambda v: str(v))
def test_triton_matches_reference(seed, dtype, m, k, n, bits, group_size, act_order):
    (qweight, qzeros, scales, perm, gs), _dense = make_layer(k, n, bits, group_size, act_order,
                                                            dtype)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    want = quant_matmul_ref(x, qweight, qzeros, scales, perm, bits=bits, group_size=gs,
                            bias=bias)

    got = quant_matmul_triton(x, qweight, qzeros, scales, perm, bits=bits, group_size=gs,
                              bias=bias, block_n=32, block_k=32)

    assert got.dtype == dtype and got.shape == (m, n)
    # Both round the dequantized weight to x's dtype and accumulate in float32: they differ
    # by the order of the sum, and the output's rounding (one ulp of a 16-bit result).
    error = (got.float() - want.float()).abs()
    allowed = TOLERANCE[dtype] + want.float().abs() * ULP[dtype]
    assert (error <= allowed).all(), f"seed {seed}: error {(error - allowed).max()} over"


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (8, -1, False)])
def test_reference_is_the_dense_matmul_of_the_layout(seed, bits, group_size, act_order):
    (qweight, qzeros, scales, perm, gs), dense = make_layer(64, 24, bits, group_size,
                                                            act_order, torch.float32)
    x = torch.randn(5, 64)
    x_rows = x[:, perm.long()] if perm is not None else x
    want = x_rows.double() @ dense.double()
    got = quant_matmul_ref(x, qweight, qzeros, scales, perm, bits=bits, group_size=gs)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_entry_point_dispatch(seed):
    (qweight, qzeros, scales, perm, gs), _ = make_layer(32, 16, 4, 16, False, torch.float32)
    x = torch.randn(2, 32)
    ref = quant_matmul(x, qweight, qzeros, scales, perm, bits=4, group_size=gs,
                       backend="torch")
    tri = quant_matmul(x, qweight, qzeros, scales, perm, bits=4, group_size=gs,
                       backend="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4)


def test_a_mismatched_qweight_is_refused():
    (qweight, qzeros, scales, _perm, gs), _ = make_layer(32, 16, 4, 16, False, torch.float32)
    with pytest.raises(ValueError, match=r"qweight \(4, 16\) does not hold a 64 x 16 4-bit"):
        quant_matmul_triton(torch.randn(2, 64), qweight, qzeros, scales, None, bits=4,
                            group_size=gs)
