"""Quantized weights and the FP8 KV cache on a CUDA GPU: correctness first, then speed.

    .venv/bin/python bench/quantization.py [--quick]

1. W4A16 / W8A16: brim's Triton dequant-matmul (`quant_matmul`) on Llama-3-8B's projections
   (qkv 4096->6144, gate_up 4096->28672, down 14336->4096; group 128, act-order off) at
   M = 1, 16, 64, 256 tokens, against torch's bf16 matmul of the same weight: checked against
   the torch reference, then median time and weight bandwidth (packed bytes / time).
2. FP8 weights: `fp8_linear` (torch._scaled_mm on sm_89+, else dequantize) on the same
   shapes against bf16.
3. FP8 KV cache: decode attention over a bf16 and an FP8 cache (32 query heads, 8 KV heads,
   head_dim 128, batch 32, contexts 4k and 16k) after a parity check, and the blocks each
   holds in the same memory.

Prints tables and writes JSON to bench/results/quantization.json. Exits cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys

import torch

SHAPES = {"qkv": (4096, 6144), "gate_up": (4096, 28672), "down": (14336, 4096)}
RESULTS = pathlib.Path(__file__).parent / "results"


def time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def random_int_layer(k, n, bits, group_size):
    from brim.kernels.quant_reference import pack_cols, pack_rows

    groups = k // group_size
    q = torch.randint(0, 2**bits, (k, n), device="cuda")
    z = torch.randint(0, 2**bits, (groups, n), device="cuda")
    scales = (torch.rand(groups, n, device="cuda") * 0.01).to(torch.bfloat16)
    return pack_rows(q, bits), pack_cols(z, bits), scales


def bench_int(quick: bool) -> list[dict]:
    from brim.kernels import quant_matmul, quant_matmul_ref
    from brim.kernels.quant_reference import dequantize

    rows = []
    for bits in (4,) if quick else (4, 8):
        for name, (k, n) in SHAPES.items():
            qweight, qzeros, scales = random_int_layer(k, n, bits, 128)
            dense = dequantize(qweight, qzeros, scales, bits, 128).to(torch.bfloat16)
            for m in (1, 16) if quick else (1, 16, 64, 256):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                got = quant_matmul(x, qweight, qzeros, scales, None, bits=bits, group_size=128)
                want = quant_matmul_ref(x, qweight, qzeros, scales, None, bits=bits,
                                        group_size=128)
                error = ((got.float() - want.float()).abs()
                         / (want.float().abs() + 1)).max().item()
                ms = time_ms(lambda: quant_matmul(x, qweight, qzeros, scales, None, bits=bits,
                                                  group_size=128))
                bf16_ms = time_ms(lambda: x @ dense)
                packed = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
                rows.append({"bits": bits, "layer": name, "m": m, "ms": ms, "bf16_ms": bf16_ms,
                             "speedup": bf16_ms / ms, "weight_gb_s": packed / ms / 1e6,
                             "max_rel_error": error})
                print(f"W{bits}A16 {name:>8} M={m:<4} {ms:8.3f} ms  bf16 {bf16_ms:8.3f} ms  "
                      f"{bf16_ms / ms:5.2f}x  {packed / ms / 1e6:7.1f} GB/s  err {error:.1e}")
    return rows


def bench_fp8(quick: bool) -> list[dict]:
    from brim.runtime.models.quantization.fp8 import quantize
    from brim.runtime.models.quantization.layers import fp8_linear, has_fp8_matmul

    rows = []
    for name, (k, n) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, scale = quantize(weight)
        for m in (1, 16) if quick else (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ms = time_ms(lambda: fp8_linear(x, q, scale, None))
            bf16_ms = time_ms(lambda: x @ weight.t())
            rows.append({"layer": name, "m": m, "ms": ms, "bf16_ms": bf16_ms,
                         "scaled_mm": has_fp8_matmul(x.device)})
            print(f"FP8 {name:>8} M={m:<4} {ms:8.3f} ms  bf16 {bf16_ms:8.3f} ms  "
                  f"{bf16_ms / ms:5.2f}x")
    return rows


def bench_fp8_kv(quick: bool) -> list[dict]:
    from brim.kernels import paged_attention, paged_attention_ref
    from brim.kernels.reference import quantize_kv

    rows = []
    heads, kv_heads, dim, block = 32, 8, 128, 16
    for context in (4096,) if quick else (4096, 16384):
        seqs = 32
        blocks = seqs * context // block
        k = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        tables = torch.randperm(blocks, device="cuda").view(seqs, -1).int()
        q = torch.randn(seqs, heads, dim, device="cuda", dtype=torch.bfloat16)
        starts = torch.arange(seqs + 1, device="cuda", dtype=torch.int32)
        lens = torch.full((seqs,), context, device="cuda", dtype=torch.int32)
        k8, v8 = quantize_kv(k, torch.float8_e4m3fn, 1.0), quantize_kv(v, torch.float8_e4m3fn,
                                                                          1.0)
        scale = 1 / math.sqrt(dim)
        got = paged_attention(q, k8, v8, tables, starts, lens, scale, max_seq_len=context)
        want = paged_attention_ref(q, k8, v8, tables, starts, lens, scale)
        error = (got.float() - want.float()).abs().max().item()
        bf16_ms = time_ms(lambda: paged_attention(q, k, v, tables, starts, lens, scale,
                                                  max_seq_len=context))
        fp8_ms = time_ms(lambda: paged_attention(q, k8, v8, tables, starts, lens, scale,
                                                 max_seq_len=context))
        rows.append({"context": context, "batch": seqs, "bf16_ms": bf16_ms, "fp8_ms": fp8_ms,
                     "max_abs_error_vs_reference": error,
                     "blocks_per_gib_bf16": 2**30 // (2 * block * kv_heads * dim * 2),
                     "blocks_per_gib_fp8": 2**30 // (2 * block * kv_heads * dim)})
        print(f"decode attention ctx {context} x {seqs}: bf16 {bf16_ms:.3f} ms, fp8 "
              f"{fp8_ms:.3f} ms (err vs reference {error:.1e})")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/quantization.py needs a CUDA GPU; nothing to measure here")
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    record = {"commit": commit, "gpu": torch.cuda.get_device_name(),
              "int": bench_int(args.quick), "fp8": bench_fp8(args.quick),
              "fp8_kv": bench_fp8_kv(args.quick)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantization.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
