"""Compile every Triton kernel variant for a GPU architecture, without a GPU.

Run as `python tests/kernels/compile_variants.py 80 [--full]` (or 90) with TRITON_INTERPRET
unset; prints one JSON line per kernel launch of each variant. `test_compile.py` runs it in a subprocess, because the
test process builds the kernels for the interpreter.

A variant is what a GPU launch would compile: the launches are planned by the real
launchers (`plan_launches`, `plan_store_kv`) on meta tensors of Llama-3-8B-like shapes,
and their arguments are turned into a signature the way Triton's JIT specialises them
(integers equal to 1 become constants, multiples of 16 and tensor pointers get 16-byte
divisibility hints). `triton.compile` then runs the whole pipeline for
`GPUTarget("cuda", arch, 32)`: ttir -> ttgir -> llir -> ptx -> cubin (ptxas from Triton's
wheel). Loading the cubin onto a device is the only step left out.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from brim.kernels.paged_attention_triton import IS_INTERPRETED, plan_launches
from brim.kernels.quant_matmul_triton import plan_quant_matmul
from brim.kernels.store_kv_triton import plan_store_kv

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (64, 80, 96, 128, 256)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


def attention_launches(kind, dtype, head_dim, *, num_kv_heads=8, group=4, block_size=16,
                       kv_dtype=None):
    num_seqs = 4
    num_heads = num_kv_heads * group
    num_tokens = num_seqs if kind.startswith("decode") else 64
    meta = dict(device="meta")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=dtype, **meta)
    k_cache = torch.empty(64, block_size, num_kv_heads, head_dim, dtype=kv_dtype or dtype,
                          **meta)
    block_tables = torch.empty(num_seqs, 32, dtype=torch.int32, **meta)
    query_start_loc = torch.empty(num_seqs + 1, dtype=torch.int32, **meta)
    seq_lens = torch.empty(num_seqs, dtype=torch.int32, **meta)
    return plan_launches(q, k_cache, k_cache, block_tables, query_start_loc, seq_lens, 0.1,
                         torch.empty_like(q), num_splits=4 if kind == "decode_split" else 1,
                         k_scale=0.5, v_scale=2.0)


def store_kv_launches(dtype, head_dim, *, num_kv_heads=8, block_size=16, kv_dtype=None):
    meta = dict(device="meta")
    key = torch.empty(16, num_kv_heads, head_dim, dtype=dtype, **meta)
    k_cache = torch.empty(64, block_size, num_kv_heads, head_dim, dtype=kv_dtype or dtype,
                          **meta)
    slot_mapping = torch.empty(16, dtype=torch.int64, **meta)
    return plan_store_kv(key, key, k_cache, k_cache, slot_mapping, 0.5, 2.0)


def quant_matmul_launches(dtype, bits, group_size, num_rows, *, in_features=4096,
                          out_features=6144):
    """A Llama-3-8B qkv projection, decode (num_rows 1) or a prefill chunk."""
    meta = dict(device="meta")
    pack = 32 // bits
    groups = 1 if group_size == -1 else in_features // group_size
    x = torch.empty(num_rows, in_features, dtype=dtype, **meta)
    qweight = torch.empty(in_features // pack, out_features, dtype=torch.int32, **meta)
    qzeros = torch.empty(groups, out_features // pack, dtype=torch.int32, **meta)
    scales = torch.empty(groups, out_features, dtype=dtype, **meta)
    out = torch.empty(num_rows, out_features, dtype=dtype, **meta)
    return plan_quant_matmul(x, qweight, qzeros, scales, None, out, bits=bits,
                             group_size=in_features if group_size == -1 else group_size)


def variants(full: bool):
    """(name, launches) for dtype x head_dim x kernel, plus other GQA groups and blocks.

    Not full: every dtype at head_dim 128 and every head_dim in bfloat16 (a cold compile
    of the whole matrix takes minutes on two cores, float32's IEEE dots most of it).
    """
    for dtype_name, dtype in DTYPES.items():
        for head_dim in HEAD_DIMS:
            if not full and head_dim != 128 and dtype != torch.bfloat16:
                continue
            for kind in ("decode", "decode_split", "prefill"):
                yield f"{kind}-{dtype_name}-d{head_dim}", attention_launches(kind, dtype, head_dim)
            yield f"store_kv-{dtype_name}-d{head_dim}", store_kv_launches(dtype, head_dim)
    fp8 = torch.float8_e4m3fn  # the launchers hand FP8 caches to the kernels as uint8
    for dtype_name, dtype in DTYPES.items():
        if not full and dtype != torch.bfloat16:
            continue
        for kind in ("decode", "decode_split", "prefill"):
            yield (f"{kind}-{dtype_name}-fp8kv-d128",
                   attention_launches(kind, dtype, 128, kv_dtype=fp8))
        yield f"store_kv-{dtype_name}-fp8kv-d128", store_kv_launches(dtype, 128, kv_dtype=fp8)
    for dtype_name, dtype in DTYPES.items():
        if not full and dtype == torch.float32:
            continue
        for bits, group_size in ((4, 128), (8, -1)) if full else ((4, 128),):
            for num_rows in (1, 64):
                yield (f"quant_matmul-{dtype_name}-w{bits}-g{group_size}-m{num_rows}",
                       quant_matmul_launches(dtype, bits, group_size, num_rows))
    if not full:
        return
    for num_kv_heads, group in ((32, 1), (4, 8), (1, 32)):  # MHA, GQA 8, MQA
        for kind in ("decode", "prefill"):
            yield (f"{kind}-bf16-d128-kv{num_kv_heads}-g{group}",
                   attention_launches(kind, torch.bfloat16, 128, num_kv_heads=num_kv_heads,
                                      group=group))
    for block_size in (8, 32, 128):
        for kind in ("decode", "prefill"):
            yield (f"{kind}-bf16-d128-bs{block_size}",
                   attention_launches(kind, torch.bfloat16, 128, block_size=block_size))


def to_source(launch):
    """An ASTSource typed and specialised as Triton's JIT would for these arguments."""
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = launch.kwargs[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{kernel.__name__}: no signature type for {name}={value!r}")
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


def main(arch: int, full: bool) -> None:
    if IS_INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the kernels were built for the interpreter")
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    for name, launches in variants(full):
        for launch in launches:
            options = backend.parse_options({"num_warps": launch.kwargs["num_warps"],
                                             "num_stages": launch.kwargs.get("num_stages", 3)})
            start = time.perf_counter()
            record = {"variant": name, "kernel": launch.kernel.__name__, "arch": arch}
            try:
                compiled = triton.compile(to_source(launch), target=target,
                                          options=options.__dict__)
                record.update(stages=list(compiled.asm), shared=compiled.metadata.shared,
                              cubin_bytes=len(compiled.asm["cubin"]))
            except Exception as error:  # reported per variant, judged by the test
                record.update(error=f"{type(error).__name__}: {error}"[:2000])
            record["seconds"] = round(time.perf_counter() - start, 2)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), full="--full" in sys.argv[2:])
