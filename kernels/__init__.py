"""Attention over the paged KV cache, and KV writes into it.

`paged_attention` and `store_kv` are the public entry points; `reference.py` holds the
contract as torch code. Each has two backends:

- "triton": the kernels in this package; for CUDA tensors, and for CPU tensors under
  `TRITON_INTERPRET=1` (Triton's interpreter, which is how they are tested on CPU);
- "torch": the reference, for CPU.

`backend=None` picks "triton" for CUDA tensors or when TRITON_INTERPRET=1, else "torch".
Triton modules are imported on first use, so that importing brim.kernels does not import
triton and the interpreter setting is read when the kernels are actually built.
"""

from __future__ import annotations

import os

import torch

from brim.kernels.quant_reference import quant_matmul_ref
from brim.kernels.reference import paged_attention_ref, store_kv_ref

BACKENDS = ("triton", "torch")


def _pick_backend(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
        return "triton" if tensor.is_cuda or interpret else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the queries
    scale: float,
    *,
    sliding_window: int | None = None,
    backend: str | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    cpu_plan=None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged context.

    See `paged_attention_ref` for the contract. max_seq_len (optional, Triton only) is a
    host-known upper bound of seq_lens that sizes the decode split-K without a device
    read-back. out (optional) receives the result and is returned. cpu_plan (optional, torch
    backend): the step's `cpu_attention.CpuAttentionPlan`, built once for all layers.
    k_scale, v_scale: an FP8 cache's per-layer scales (reference.py; ignored otherwise).
    """
    if _pick_backend(backend, q) == "triton":
        from brim.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
            sliding_window=sliding_window, max_seq_len=max_seq_len, out=out,
            k_scale=k_scale, v_scale=v_scale)
    if cpu_plan is not None:
        from brim.kernels.cpu_attention import paged_attention_cpu

        result = paged_attention_cpu(q, k_cache, v_cache, cpu_plan, scale,
                                     sliding_window=sliding_window, k_scale=k_scale,
                                     v_scale=v_scale)
    else:
        result = paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc,
                                     seq_lens, scale, sliding_window=sliding_window,
                                     k_scale=k_scale, v_scale=v_scale)
    if out is None:
        return result
    return out.copy_(result)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens]; block_id * block_size + offset, -1 = skip
    *,
    backend: str | None = None,
    finite: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K and V into its cache slot; slot -1 (padding) is skipped.

    finite (torch backend): write non-finite values as 0 (and skip no slot), the cache that
    the CPU path's attention expects (cpu_attention.store_kv_cpu).
    k_scale, v_scale: an FP8 cache stores key / k_scale, value / v_scale.
    """
    if _pick_backend(backend, key) == "triton":
        from brim.kernels.store_kv_triton import store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    elif finite:
        from brim.kernels.cpu_attention import store_kv_cpu

        store_kv_cpu(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def quant_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / PACK, N]
    qzeros: torch.Tensor,  # int32 [G, N / PACK]
    scales: torch.Tensor,  # [G, N]
    perm: torch.Tensor | None,  # int32 [K]: act-order, or None
    *,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W in brim's packed 4/8-bit layout (quant_reference.py)."""
    if _pick_backend(backend, x) == "triton":
        from brim.kernels.quant_matmul_triton import quant_matmul_triton

        return quant_matmul_triton(x, qweight, qzeros, scales, perm, bits=bits,
                                   group_size=group_size, bias=bias)
    return quant_matmul_ref(x, qweight, qzeros, scales, perm, bits=bits,
                            group_size=group_size, bias=bias)


__all__ = ["paged_attention", "store_kv", "quant_matmul", "paged_attention_ref",
           "store_kv_ref", "quant_matmul_ref"]
