"""FP8 (e4m3) KV cache: store_kv writes the same bytes as torch's conversion, and both
attention kernels (Triton, interpreted on CPU) and the CPU path read it as the reference
does; against the unquantized cache, attention stays within FP8's precision."""

import math

import pytest
import torch
from brim.kernels import paged_attention_ref, store_kv, store_kv_ref
from brim.kernels.paged_attention_triton import paged_attention_triton
from brim.kernels.reference import quantize_kv

from tests.kernels.test_paged_attention import make_batch, mixed_seqs

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 3.0)])
def test_store_kv_fp8_writes_torchs_bytes(seed, dtype, k_scale, v_scale):
    num_tokens, kv_heads, head_dim = 12, 2, 40
    # Normal values, e4m3 subnormals (below 2^-6 after scaling), values past +-448 (saturate)
    # and exact zeros of both signs.
    key = (torch.randn(num_tokens, kv_heads, head_dim) * torch.tensor(
        [1e-3, 0.01, 1.0, 30.0, 600.0, 1.0])[torch.arange(head_dim) % 6]).to(dtype)
    key[0, 0, :2] = torch.tensor([0.0, -0.0])
    value = (torch.randn(num_tokens, kv_heads, head_dim) * 100).to(dtype)
    slot_mapping = torch.randperm(4 * 16)[:num_tokens]
    slot_mapping[3] = -1
    k_cache = torch.zeros(4, 16, kv_heads, head_dim, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_want, v_want, slot_mapping, k_scale, v_scale)

    store_kv(key, value, k_cache, v_cache, slot_mapping, backend="triton", k_scale=k_scale,
             v_scale=v_scale)

    assert torch.equal(k_cache.view(torch.uint8), k_want.view(torch.uint8)), f"seed {seed}"
    assert torch.equal(v_cache.view(torch.uint8), v_want.view(torch.uint8)), f"seed {seed}"
    # The reference is torch's saturating conversion of x / scale.
    written = slot_mapping >= 0
    flat = k_want.view(-1, kv_heads, head_dim)[slot_mapping[written]]
    assert torch.equal(flat.view(torch.uint8), (key[written].float() / k_scale).clamp(
        -448, 448).to(FP8).view(torch.uint8))


def fp8_batch(seqs, k_scale, v_scale, *, group=3, head_dim=64, dtype=torch.float32):
    q, k_cache, v_cache, *rest = make_batch(seqs, num_kv_heads=2, group=group,
                                            head_dim=head_dim, block_size=16, dtype=dtype)
    k8 = quantize_kv(k_cache, FP8, k_scale)
    v8 = quantize_kv(v_cache, FP8, v_scale)
    return (q, k_cache, v_cache, *rest), (q, k8, v8, *rest)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_attention_reads_fp8_as_the_reference(seed, kind, dtype):
    seqs = [(1, 1), (17, 1), (130, 1)] if kind == "decode" else mixed_seqs(16)
    k_scale, v_scale = 0.5, 2.0
    full, batch = fp8_batch(seqs, k_scale, v_scale, dtype=dtype)
    scale = 1 / math.sqrt(64)
    want = paged_attention_ref(*batch, scale, k_scale=k_scale, v_scale=v_scale)
    exact = paged_attention_ref(*full, scale)

    got = paged_attention_triton(*batch, scale, k_scale=k_scale, v_scale=v_scale)

    assert torch.isfinite(got).all()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance,
                               msg=lambda e: f"seed {seed}: {e}")
    # Against the unquantized cache: e4m3 keeps 3 mantissa bits (relative error <= 2^-4).
    assert (got.float() - exact.float()).abs().max() < 0.25, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_place", [True, False], ids=["cpp-decode", "sdpa-decode"])
def test_cpu_path_reads_fp8_as_the_reference(seed, dtype, in_place):
    from brim.kernels.cpu_attention import CpuAttentionPlan, paged_attention_cpu

    k_scale, v_scale = 0.25, 4.0
    _, batch = fp8_batch(mixed_seqs(16), k_scale, v_scale, dtype=dtype)
    q, k8, v8, block_tables, query_start_loc, seq_lens = batch
    for cache in (k8, v8):  # the CPU path's cache holds only finite values
        cache.view(torch.uint8)[cache.float().isnan()] = 0
    scale = 1 / math.sqrt(64)
    want = paged_attention_ref(*batch, scale, k_scale=k_scale, v_scale=v_scale)
    plan = CpuAttentionPlan.build(block_tables, query_start_loc, seq_lens, 16, in_place=in_place)
    assert (plan.decodes is not None) == in_place

    got = paged_attention_cpu(q, k8, v8, plan, scale, k_scale=k_scale, v_scale=v_scale)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
