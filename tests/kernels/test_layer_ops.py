"""The fused C++ layer ops (kernels/cpu_layer_ops.cpp) against the torch ops they replace in
steps of a few tokens (llama.py, `between_attentions_few`): the model's own RMSNorm, SiLU and
RoPE modules as the reference, in float32, bfloat16 and float16, on rows that are views of
wider tensors as in the engine. The model-level check (the few-token path against the model
run op by op, and greedy parity) is in tests/runtime/models/test_compiled.py and
tests/runtime/engine/test_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brim.kernels.cpu_decode import layer_ops
from brim.runtime.models.llama import RMSNorm
from brim.runtime.models.rope import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops():
    ops = layer_ops()
    assert ops is not None, "the C++ kernels did not build"
    return ops


def _close(got, want, dtype):
    """float32: to rounding (the norm's sum runs in another order). 16-bit: every step rounds
    where torch's does, so all but a rare last-bit difference (from that sum) are equal."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        assert (got == want).float().mean() > 0.99, "16-bit rounding steps differ from torch's"


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_in_place_and_norms_like_the_module(ops, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.5 + 1)
    wide = (torch.randn(5, 1000) * 3).to(dtype)
    x = wide[:, 100:676].clone()
    residual = wide[:, 200:776]  # a strided view, like a projection's slice
    want_x = x + residual
    want = norm(want_x)
    got = ops.add_rms_norm_(x, residual, norm.weight, norm.eps)
    assert torch.equal(x, want_x), "the residual add is x + residual, rounded once"
    _close(got, want, dtype)
    _close(ops.rms_norm(want_x, norm.weight, norm.eps), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(ops, dtype):
    torch.manual_seed(1)
    gate_up = (torch.randn(7, 2 * 1536) * 4).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    want = F.silu(gate) * up
    _close(ops.silu_mul(gate_up), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_in_place_matches_the_rotary_module(ops, dtype, head_dim):
    torch.manual_seed(2)
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, {"rope_type": "default"})
    rotary.build("cpu")
    heads, kv_heads, tokens = 9, 3, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([0, 1, 17, 300, 4095, 1000])
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, -1, head_dim)
    want = rotary.rotate(positions, qk)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    ops.rope_(qk, positions, rotary.cos_sin)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before), "v untouched"
    if dtype == torch.float32:
        torch.testing.assert_close(qk, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(qk, want), "each product and the sum rounded as torch rounds them"
    with pytest.raises(RuntimeError, match="position 4096 out of"):
        ops.rope_(qk, torch.tensor([0, 1, 2, 3, 4, 4096]), rotary.cos_sin)
