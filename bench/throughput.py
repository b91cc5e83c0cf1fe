"""Offline throughput: brim's engine against transformers' generate(), same workload, one run.

Workload: N requests with prompts of uniform random length in [min_prompt, max_prompt]
tokens and outputs of uniform random length in [min_output, max_output], greedy,
ignore_eos (every request produces exactly its output length).

transformers is used the usual way: left-padded batches of --hf-batch-size in arrival
order, generate(max_new_tokens = the batch's longest output, min_new_tokens = the same, so
EOS cannot end it early). Only each request's own output length counts as useful tokens.

    python bench/throughput.py [--num-requests 64] [--model PATH] [--json out.json]
                               [--tensor-parallel-size N] [--no-transformers]
    python bench/throughput.py --quantization fp8 --kv-cache-dtype fp8   # FP8 weights and KV

--quantization / --kv-cache-dtype apply to brim only (transformers runs the checkpoint as
it is; a GPTQ/AWQ checkpoint needs --no-transformers, transformers' integrations need
packages brim does not install). brim's KV-cache blocks and weight bytes are recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch


def workload(args, vocab_size: int):
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.num_requests):
        prompt_len = rng.randint(args.min_prompt, args.max_prompt)
        output_len = rng.randint(args.min_output, args.max_output)
        # Ordinary token ids (skip the first 100: special and control tokens).
        prompt = [rng.randrange(100, vocab_size) for _ in range(prompt_len)]
        requests.append((prompt, output_len))
    return requests


def run_brim(model_path: str, requests, args) -> dict:
    from brim.runtime import LLM, SamplingParams

    llm = LLM(model_path, dtype=args.dtype, device=args.device,
              max_num_seqs=args.max_num_seqs, tensor_parallel_size=args.tensor_parallel_size,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([requests[0][0]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == sum(n for _, n in requests)
    preemptions = llm.engine.get_stats().num_preemptions
    report = llm.engine.memory_report
    llm.shutdown()
    return {"seconds": elapsed, "output_tokens": generated, "preemptions": preemptions,
            "tensor_parallel_size": args.tensor_parallel_size,
            "num_gpu_blocks": report.num_gpu_blocks, "kv_bytes_per_token":
            report.kv_bytes_per_token, "weights_bytes": report.weights_bytes}


def run_transformers(model_path: str, requests, args) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    device = "cuda" if args.device == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(batch):
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):  # left padding, as for decoder-only models
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        new = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=pad)

    generate([(requests[0][0], 4)])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(requests), args.hf_batch_size):
        generate(requests[i:i + args.hf_batch_size])
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": sum(n for _, n in requests)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: bundled)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="brim's ranks (processes); on CPU they share the cores")
    parser.add_argument("--no-transformers", action="store_true",
                        help="measure brim only (e.g. to compare tensor-parallel sizes)")
    parser.add_argument("--quantization", default=None, choices=["gptq", "awq", "fp8"],
                        help="brim's --quantization (default: the checkpoint's scheme)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="brim's KV-cache dtype")
    parser.add_argument("--json", default="bench/results/throughput.json")
    args = parser.parse_args()

    # The code being measured is the checkout at start (recorded before anything runs).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if args.model is None:
        from brim.runtime.models.bundled import bundled_model_path

        args.model = str(bundled_model_path())
    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    requests = workload(args, vocab_size)

    results = {"brim": run_brim(args.model, requests, args)}
    if not args.no_transformers:
        results["transformers"] = run_transformers(args.model, requests, args)
    for r in results.values():
        r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
    ratio = None
    if "transformers" in results:
        ratio = (results["brim"]["output_tokens_per_s"]
                 / results["transformers"]["output_tokens_per_s"])

    print(f"\nworkload: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt}"
          f" tokens, outputs {args.min_output}-{args.max_output} tokens, greedy, ignore_eos; "
          f"{args.dtype} on {args.device}, torch threads {torch.get_num_threads()}, "
          f"brim tensor_parallel_size {args.tensor_parallel_size}, quantization "
          f"{args.quantization or 'as checkpoint'}, KV cache {args.kv_cache_dtype}")
    print(f"{'engine':<14}{'seconds':>10}{'output tokens':>15}{'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>10.1f}{r['output_tokens']:>15}"
              f"{r['output_tokens_per_s']:>10.1f}")
    brim = results["brim"]
    print(f"brim KV cache: {brim['num_gpu_blocks']} blocks, {brim['kv_bytes_per_token']} "
          f"bytes/token; weights {brim['weights_bytes'] / 2**20:.1f} MiB")
    if ratio is not None:
        print(f"brim / transformers: {ratio:.2f}x")

    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.node(),
              "cpu_count": torch.get_num_threads(), "args": vars(args), "results": results,
              "ratio": ratio}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
