"""brim on a CUDA GPU against brim on CPU and against transformers, on the engine's parity prompts.

    python bench/gpu_parity.py [--model PATH] [--new-tokens 32] [--json out.json]

Two questions, one run, greedy (ignore_eos), the 8 parity prompts of
tests/runtime/engine/test_parity.py (chat-templated and raw, 5 to 300+ tokens):

1. Exactness of the GPU path (Triton store_kv, decode and varlen kernels inside the engine):
   brim float32 on the GPU must produce transformers' float32 greedy tokens exactly, with
   the prompts batched, one at a time, under forced preemption, under forced chunked
   prefill, and on a second pass that reads its prefix from the prefix cache.
2. Agreement of bfloat16 on the GPU with float32 on the CPU (brim's own engine both times):
   how many generated tokens agree per prompt before the first divergence. bf16 rounding
   makes late divergence expected; it is reported, not asserted.

Prints a table, writes JSON (default bench/results/gpu_parity.json), exits 1 when a
float32 scenario differs from transformers. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # for tests.*; appended: the repo root holds a folder named operator


def parity_prompts(tokenizer) -> list[list[int]]:
    from tests.runtime.engine.test_parity import CHAT_PROMPTS, RAW_PROMPTS

    chat = [tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False) for c in CHAT_PROMPTS]
    return chat + [tokenizer.encode(p) for p in RAW_PROMPTS]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: bundled)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "gpu_parity.json"))
    args = parser.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("gpu_parity: no CUDA GPU here; nothing to measure (run it on a GPU machine)")
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brim.runtime import LLM, SamplingParams
    from brim.runtime.models.bundled import bundled_model_path
    from tests.runtime.conftest import hf_greedy

    model = args.model or str(bundled_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = parity_prompts(tokenizer)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def run(llm, batch):
        return [o.outputs[0].token_ids for o in llm.generate(batch, greedy, use_tqdm=False)]

    # transformers float32 on the GPU: the reference for brim's float32 GPU path.
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()

    reference = [hf_greedy(hf, p, args.new_tokens) for p in prompts]
    del hf
    torch.cuda.empty_cache()

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "prompt_lengths": [len(p) for p in prompts], "new_tokens": args.new_tokens,
               "float32_scenarios": {}, "bf16_vs_cpu_fp32": {}}
    scenarios = {
        "all at once": {},
        "one at a time": {},
        "preemption": {"num_gpu_blocks": 48, "max_model_len": 768},
        "chunked prefill": {"max_num_batched_tokens": 40, "max_num_seqs": 8},
        "prefix cache, second pass": {},
    }
    failed = False
    print(f"{'float32 GPU scenario':<28} {'prompts equal to transformers':>30}")
    for name, engine_args in scenarios.items():
        llm = LLM(model, dtype="float32", device="cuda", **engine_args)
        if name == "one at a time":
            got = [run(llm, [p])[0] for p in prompts]
        elif name == "prefix cache, second pass":
            run(llm, prompts)
            hits_before = llm.engine.get_stats().prefix_cache_hits
            got = run(llm, prompts)
            results["prefix_cache_hit_tokens"] = (llm.engine.get_stats().prefix_cache_hits
                                                  - hits_before)
        else:
            got = run(llm, prompts)
        equal = [g == r for g, r in zip(got, reference)]
        extra = {}
        if name == "preemption":
            extra["preemptions"] = llm.engine.get_stats().num_preemptions
        results["float32_scenarios"][name] = {
            "equal": equal, "agreeing": [agreeing_prefix(g, r) for g, r in zip(got, reference)],
            **extra}
        failed |= not all(equal)
        print(f"{name:<28} {sum(equal):>27}/{len(equal)}  {extra or ''}")
        del llm
        torch.cuda.empty_cache()

    # brim float32 on the CPU against brim bfloat16 on the GPU.
    cpu = run(LLM(model, dtype="float32", device="cpu"), prompts)
    bf16 = run(LLM(model, dtype="bfloat16", device="cuda"), prompts)
    agree = [agreeing_prefix(a, b) for a, b in zip(cpu, bf16)]
    cpu_vs_hf = [c == r for c, r in zip(cpu, reference)]
    results["bf16_vs_cpu_fp32"] = {"agreeing": agree, "cpu_fp32_equals_hf_gpu_fp32": cpu_vs_hf}
    print(f"\nbf16 GPU vs fp32 CPU, tokens agreeing before the first divergence "
          f"(of {args.new_tokens}):")
    for p, n in zip(prompts, agree):
        print(f"  prompt of {len(p):>4} tokens: {n:>3}")
    print(f"  all {args.new_tokens}: {sum(n == args.new_tokens for n in agree)}/{len(agree)}; "
          f"fp32 CPU == fp32 GPU transformers on {sum(cpu_vs_hf)}/{len(cpu_vs_hf)}")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
