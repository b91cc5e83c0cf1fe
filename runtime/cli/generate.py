"""`brim generate`: answer prompts offline with the engine (the bundled model by default)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text offline",
                              description="Generate text with brim's engine, no server.")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None, help="checkpoint folder or hf://<org>/<name> "
                   "(default: bundled SmolLM2)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of the --model repository")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, choices=["gptq", "awq", "fp8"])
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", default=None)
    p.add_argument("--num-gpu-blocks", type=int, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks (processes), as brim serve does")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run the model op by op (default on CPU: compiled, as brim serve)")
    p.add_argument("--cache-dir", default=None, help="where the bundled model is converted "
                   "(default: $BRIM_CACHE_DIR or ~/.cache/brim)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from brim.runtime import LLM, SamplingParams

    llm = None
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device,
                  max_model_len=args.max_model_len, num_gpu_blocks=args.num_gpu_blocks,
                  cache_dir=args.cache_dir, revision=args.revision,
                  tensor_parallel_size=args.tensor_parallel_size,
                  quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                  enforce_eager=args.enforce_eager)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens)
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            conversations = [system + [{"role": "user", "content": p}] for p in args.prompts]
            outputs = llm.chat(conversations, params)
        else:
            outputs = llm.generate(args.prompts, params)
    except (ValueError, FileNotFoundError) as exc:
        print(f"brim generate: {exc}", file=sys.stderr)
        return 2
    finally:
        if llm is not None:
            llm.shutdown()
    for prompt, output in zip(args.prompts, outputs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(output.outputs[0].text)
    return 0
