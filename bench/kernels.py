"""Benchmark brim's Triton attention kernels on a CUDA GPU.

    .venv/bin/python bench/kernels.py [--quick]

Decode: achieved bandwidth of `paged_attention` over one query per sequence (bytes = K/V
read + q + out) against the GPU's measured device-to-device copy bandwidth, over batch
(1-256) x context (512-32k). Prefill: throughput (causal FLOP/s) of `paged_attention` over
whole prompts against `torch.nn.functional.scaled_dot_product_attention` on the same
shapes. Shapes are Llama-3-8B's: 32 query heads, 8 KV heads, head_dim 128, bfloat16,
block_size 16, shuffled physical blocks.

Targets on an H100: decode >= 80% of copy bandwidth at batch >= 32 and context >= 4k;
prefill >= 70% of SDPA's throughput. Before timing, one decode and one mixed batch are
checked against the torch reference on the GPU.

Prints a table and writes JSON to bench/results/ (git-ignored). Exits cleanly without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
BATCHES = (1, 4, 16, 32, 64, 128, 256)
CONTEXTS = (512, 1024, 4096, 8192, 16384, 32768)
PREFILL_TOKENS = 16384  # per batch: batch = PREFILL_TOKENS // context (at least 1)
MAX_CACHE_BYTES = 24 << 30  # skip decode cases whose K/V cache would not fit comfortably
DECODE_TARGET, PREFILL_TARGET = 0.80, 0.70
RESULTS = pathlib.Path(__file__).parent / "results"


def time_ms(fn) -> float:
    """Median milliseconds per call (Triton's do_bench: CUDA events, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), on 1 GiB."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def paged_batch(num_seqs, context, query_len):
    """A paged cache holding num_seqs contexts, queries the last query_len of each."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    block_tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    block_tables = block_tables.view(num_seqs, blocks_per_seq)
    query_start_loc = torch.arange(num_seqs + 1, device="cuda", dtype=torch.int32) * query_len
    seq_lens = torch.full((num_seqs,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(num_seqs * query_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return q, k_cache, v_cache, block_tables, query_start_loc, seq_lens


def check_parity() -> float:
    """Max abs error of the Triton path against the torch reference, decode and mixed."""
    from brim.kernels import paged_attention, paged_attention_ref

    worst = 0.0
    scale = 1 / math.sqrt(HEAD_DIM)
    for num_seqs, context, query_len in ((8, 1000, 1), (3, 700, 150)):
        batch = paged_batch(num_seqs, context // BLOCK_SIZE * BLOCK_SIZE, query_len)
        if query_len > 1:  # mix a decode into the prefill batch
            q, *rest = batch
            qsl = batch[4].clone()
            qsl[1:] -= query_len - 1
            batch = (q[: int(qsl[-1])], *rest[:3], qsl, batch[5])
        for window in (None, 256):
            got = paged_attention(*batch, scale, sliding_window=window, backend="triton")
            want = paged_attention_ref(*batch, scale, sliding_window=window)
            worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def bench_decode(copy_bw: float, batches, contexts) -> list[dict]:
    from brim.kernels import paged_attention
    from brim.kernels.paged_attention_triton import decode_config, num_decode_splits

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
            if kv_bytes > MAX_CACHE_BYTES:
                continue
            args = paged_batch(batch, context, 1)
            out = torch.empty_like(args[0])
            ms = time_ms(lambda: paged_attention(*args, 1 / math.sqrt(HEAD_DIM),
                                                 backend="triton", max_seq_len=context,
                                                 out=out))
            total = kv_bytes + 2 * args[0].numel() * DTYPE.itemsize  # + q read + out write
            bandwidth = total / (ms * 1e-3)
            splits = num_decode_splits(batch, NUM_KV_HEADS, context,
                                       decode_config(HEAD_DIM, DTYPE).block_n, sms)
            rows.append(dict(batch=batch, context=context, splits=splits, ms=ms,
                             gbps=bandwidth / 1e9, fraction_of_copy=bandwidth / copy_bw,
                             in_target=batch >= 32 and context >= 4096))
            del args, out
            torch.cuda.empty_cache()
    return rows


def bench_prefill(contexts) -> list[dict]:
    from torch.nn.functional import scaled_dot_product_attention

    from brim.kernels import paged_attention

    rows = []
    for context in contexts:
        batch = max(1, PREFILL_TOKENS // context)
        args = paged_batch(batch, context, context)
        scale = 1 / math.sqrt(HEAD_DIM)
        out = torch.empty_like(args[0])
        ms = time_ms(lambda: paged_attention(*args, scale, backend="triton", out=out))
        # SDPA on the same tokens, dense [batch, heads, context, head_dim]; K/V expanded to
        # all query heads outside the timing so that its fastest (flash) kernel applies.
        q = args[0].view(batch, context, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        k = torch.randn(batch, NUM_HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        sdpa_ms = time_ms(lambda: scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               scale=scale))
        flops = 4 * batch * NUM_HEADS * HEAD_DIM * context * (context + 1) / 2  # causal
        rows.append(dict(batch=batch, context=context, ms=ms, sdpa_ms=sdpa_ms,
                         tflops=flops / (ms * 1e-3) / 1e12,
                         sdpa_tflops=flops / (sdpa_ms * 1e-3) / 1e12,
                         fraction_of_sdpa=sdpa_ms / ms))
        del args, out, q, k, v
        torch.cuda.empty_cache()
    return rows


def git_commit() -> str:
    """HEAD's short hash ($BRIM_COMMIT where the tree was copied without .git)."""
    if os.environ.get("BRIM_COMMIT"):
        return os.environ["BRIM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU here; nothing measured. Run it on a machine "
              "with one: .venv/bin/python bench/kernels.py")
        return 0
    import triton

    batches = (1, 32, 256) if args.quick else BATCHES
    contexts = (512, 4096, 32768) if args.quick else CONTEXTS
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {git_commit()}")
    error = check_parity()
    print(f"parity with the torch reference (bf16, decode + mixed, sliding window): "
          f"max abs error {error:.2e}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s\n")

    decode = bench_decode(copy_bw, batches, contexts)
    print(f"{'decode':>8} {'batch':>6} {'context':>8} {'splits':>6} {'ms':>8} {'GB/s':>7} "
          f"{'of copy':>8}")
    for row in decode:
        mark = ("" if not row["in_target"]
                else "  ok" if row["fraction_of_copy"] >= DECODE_TARGET else "  BELOW TARGET")
        print(f"{'':>8} {row['batch']:>6} {row['context']:>8} {row['splits']:>6} "
              f"{row['ms']:>8.3f} {row['gbps']:>7.0f} {row['fraction_of_copy']:>8.0%}{mark}")

    prefill = bench_prefill(contexts)
    print(f"\n{'prefill':>8} {'batch':>6} {'context':>8} {'ms':>8} {'TFLOP/s':>8} "
          f"{'SDPA':>8} {'of SDPA':>8}")
    for row in prefill:
        mark = "  ok" if row["fraction_of_sdpa"] >= PREFILL_TARGET else "  BELOW TARGET"
        print(f"{'':>8} {row['batch']:>6} {row['context']:>8} {row['ms']:>8.3f} "
              f"{row['tflops']:>8.1f} {row['sdpa_tflops']:>8.1f} "
              f"{row['fraction_of_sdpa']:>8.0%}{mark}")

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"kernels-{stamp}.json"
    path.write_text(json.dumps(dict(
        date=stamp, device=device, commit=git_commit(), torch=torch.__version__,
        triton=triton.__version__, shapes=dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                                               head_dim=HEAD_DIM, dtype=str(DTYPE),
                                               block_size=BLOCK_SIZE),
        parity_max_abs_error=error, copy_gbps=copy_bw / 1e9, decode=decode, prefill=prefill,
    ), indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
