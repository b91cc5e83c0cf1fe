"""`brim plan`: what fits on a GPU, before anything starts. Torch-free."""

from __future__ import annotations

import argparse
import json
import sys

from brim.runtime.planner.facts import read_checkpoint
from brim.runtime.planner.gpus import lookup_gpu, parse_memory
from brim.runtime.planner.lengths import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from brim.runtime.planner.memory import (DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION,
                                         MAX_GPU_MEMORY_UTILIZATION, GiB, Plan, PlanRequest, plan)

CONCURRENCY_LENGTHS = (4096, 8192, 32768)


def _auto_or_int(value: str) -> str | int:
    return value if value == "auto" else int(value)


def _auto_or_float(value: str) -> str | float:
    return value if value == "auto" else float(value)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict what fits on a GPU: KV-cache blocks, context length, concurrency",
        description="Predict GPU memory for serving a model before anything starts: weights, "
                    "non-KV memory, KV-cache blocks and concurrency; says what would fit when "
                    "the settings do not.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="checkpoint folder holding config.json (and, if present, "
                                       "tokenizer_config.json and *.safetensors)")
    model.add_argument("--config", help="a config.json file (weights estimated from it)")
    gpu = parser.add_mutually_exclusive_group(required=True)
    gpu.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB, 81559MiB, 80GB")
    gpu.add_argument("--gpu", help="GPU product, e.g. NVIDIA-H100-80GB-HBM3 or H100-80GB")
    parser.add_argument("--tensor-parallel-size", "-tp", type=_auto_or_int, default=1,
                        help="GPUs per replica, or auto (default 1)")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="GPUs available, bounding --tensor-parallel-size auto")
    parser.add_argument("--max-model-len", default=None,
                        help="context length (e.g. 32k), or auto: the largest that fits "
                             "(default: the model's maximum)")
    parser.add_argument("--gpu-memory-utilization", type=_auto_or_float,
                        default=DEFAULT_GPU_MEMORY_UTILIZATION,
                        help=f"share of GPU memory to use, or auto: the smallest <= "
                             f"{MAX_GPU_MEMORY_UTILIZATION} that fits "
                             f"(default {DEFAULT_GPU_MEMORY_UTILIZATION})")
    parser.add_argument("--min-model-len", default=None,
                        help="with --max-model-len auto: the least context to settle for "
                             "(shorter does not fit)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: plan a CPU runtime in --gpu-memory of container memory")
    parser.add_argument("--min-concurrency", type=int, default=1,
                        help="requests of max_model_len that must fit at once (default 1)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="auto (the model dtype), bfloat16, float16, fp8")
    parser.add_argument("--quantization", "-q", default=None, choices=["gptq", "awq", "fp8"],
                        help="default: the checkpoint's own scheme (config.json); fp8 "
                             "quantizes a 16-bit checkpoint's linear layers while loading")
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--max-num-batched-tokens", default=None,
                        help="tokens per step (default: the CUDA engine's, "
                             f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']})")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="no CUDA graphs (brim's engine runs eagerly today)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Exit code 0 when the settings fit, 1 when they do not, 2 on bad input."""
    try:
        if args.gpu:
            gpu_name, gpu_memory = lookup_gpu(args.gpu)
        else:
            gpu_name, gpu_memory = None, parse_memory(args.gpu_memory)
        result = plan(PlanRequest(
            checkpoint=read_checkpoint(args.model or args.config),
            gpu_memory_bytes=gpu_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size,
            dtype=args.dtype,
            kv_cache_dtype=args.kv_cache_dtype,
            min_concurrency=args.min_concurrency,
            num_gpus=args.num_gpus,
            enforce_eager=args.enforce_eager,
            min_model_len=args.min_model_len,
            device=args.device,
            quantization=args.quantization,
        ))
    except (ValueError, FileNotFoundError) as exc:
        print(f"brim plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_dict()
        out["gpu"] = gpu_name
        out["concurrency_at"] = {str(n): result.concurrency_at(n)
                                 for n in (*CONCURRENCY_LENGTHS, result.max_model_len)
                                 if n > 0}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(result, gpu_name))
    return 0 if result.fits else 1


def format_plan(p: Plan, gpu_name: str | None = None) -> str:
    """The plan as a readable table."""

    def gib(num_bytes: int) -> str:
        return f"{num_bytes / GiB:8.2f} GiB"

    gpu = f"{gpu_name} " if gpu_name else ""
    rows = [
        ("GPU", f"{gpu}{p.gpu_memory_bytes / GiB:.2f} GiB x {p.tensor_parallel_size} "
                f"(tensor parallel)"),
        ("budget", f"{gib(int(p.gpu_memory_bytes * p.gpu_memory_utilization))}  "
                   f"(gpu_memory_utilization {p.gpu_memory_utilization:.2f})"),
        ("weights", f"{gib(p.weights_bytes)}  ({p.quantization or p.dtype}, from "
                    f"{p.weights_source})"),
        ("activations", f"{gib(p.activation_bytes)}  "
                        f"(max_num_batched_tokens {p.max_num_batched_tokens})"),
        ("non-torch", gib(p.non_torch_bytes)),
        ("CUDA graphs", gib(p.cuda_graph_bytes)),
        ("non-KV total", gib(p.non_kv_bytes)),
        ("KV cache", f"{gib(p.kv_cache_bytes)}  ({p.kv_bytes_per_token} bytes/token, "
                     f"{p.kv_cache_dtype})"),
        ("blocks", f"{p.num_gpu_blocks} x {p.block_size} tokens = {p.kv_cache_tokens} tokens"),
        ("max_model_len", f"{p.max_model_len}  (model maximum {p.derived_max_model_len})"),
    ]
    for n in CONCURRENCY_LENGTHS:
        beyond = "  (beyond the model's maximum)" if n > p.derived_max_model_len else ""
        rows.append((f"concurrency @{n // 1024}k", f"{p.concurrency_at(n)}{beyond}"))
    if p.max_model_len > 0:
        rows.append(("concurrency @max", f"{p.concurrency_at(p.max_model_len)}  "
                                          f"({p.max_model_len} tokens)"))
    rows.append(("verdict", "fits" if p.fits else "DOES NOT FIT"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"  - {message}" for message in p.messages]
    return "\n".join(lines)
