"""How close is `brim plan` to what the runtime measures? (CUDA only.)

For several model shapes (random-weight checkpoints of real architectures, made from the
published configs in tests/data/configs with fewer layers so they load fast) x 2
gpu_memory_utilization x 2 max_num_batched_tokens, start the engine on the GPU, read
`llm.engine.memory_report` (measured and predicted) and compare the predicted number of KV
blocks with the measured one. Target: within +-3%. Then, at those settings, run the
heaviest steps the scheduler can form (full-budget prefills, max_num_seqs decodes): none
may run out of memory.

    python bench/sizing_accuracy.py [--models smollm2,llama3-8l,...] [--work-dir DIR]

Prints a table, writes bench/results/sizing_accuracy-<UTC time>.json, exits 1 when a
prediction misses by more than 3%. Each measurement runs in its own process so CUDA context
and allocator state do not leak from one run into the next.

The overhead constants in brim/runtime/planner/memory.py are calibrated with this script: when
a row misses, the JSON holds measured weights / non-KV bytes beside the predicted ones (the
engine's MemoryReport: the same field names on both sides).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "configs"
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 0.03
UTILIZATIONS = (0.50, 0.90)
BATCHED_TOKENS = (2048, 8192)

# name -> (published config, overrides: fewer layers keep checkpoints small and quick to build)
SHAPES = {
    "smollm2-135m": ("SmolLM2-135M-Instruct", {"dtype": "bfloat16"}),
    "llama3-8b-8l": ("Meta-Llama-3-8B-Instruct", {"num_hidden_layers": 8}),
    "qwen2-7b-8l": ("Qwen2-7B-Instruct", {"num_hidden_layers": 8}),
    "mistral-7b-8l": ("Mistral-7B-v0.1", {"num_hidden_layers": 8}),
}


def build_checkpoint(name: str, work_dir: Path) -> Path:
    """A random-weight bf16 checkpoint of the shape, with the bundled model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from brim.runtime.models.bundled import bundled_model_path

    target = work_dir / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source, overrides = SHAPES[name]
    hf = json.loads((CONFIGS / f"{source}.json").read_text())
    hf.update(overrides)
    hf.pop("torch_dtype", None)
    hf["dtype"] = "bfloat16"
    model_type = hf.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "auto_map"):
        hf.pop(key, None)
    config = AutoConfig.for_model(model_type, **hf)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    tokenizer_dir = bundled_model_path()
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, target / file.name)
    return target


def measure(path: str, utilization: float, num_batched_tokens: int) -> dict:
    """One engine start-up (runs in a worker process): measured and predicted memory."""
    import torch

    from brim.runtime import LLM
    from brim.runtime.planner import PlanRequest, plan, read_checkpoint

    llm = LLM(model=path, device="cuda", gpu_memory_utilization=utilization,
              max_num_batched_tokens=num_batched_tokens)
    engine = llm.engine
    report = engine.memory_report
    total = torch.cuda.mem_get_info()[1]
    # The plan as this script computes it, for the same settings as the engine's.
    ours = plan(PlanRequest(
        checkpoint=read_checkpoint(path), gpu_memory_bytes=total,
        gpu_memory_utilization=utilization, max_num_batched_tokens=num_batched_tokens,
        max_model_len=engine.max_model_len, max_num_seqs=engine.config.scheduler.max_num_seqs,
        block_size=engine.config.cache.block_size, dtype=engine.config.model.dtype))
    as_json = report.to_json()
    return {"measured": as_json["measured"], "predicted": as_json["predicted"],
            "num_gpu_blocks": report.num_gpu_blocks, "plan": ours.to_dict(),
            "gpu": torch.cuda.get_device_name(), "total_bytes": total, "stress": stress(llm)}


def stress(llm) -> dict:
    """Run the heaviest steps these settings allow; an out-of-memory error is a miss.

    A few prompts of a full step's tokens each (every prefill step is as large as the
    profiling forward), beside enough short ones to decode max_num_seqs sequences at once.
    """
    import random

    import torch

    from brim.runtime import SamplingParams

    engine = llm.engine
    max_num_seqs = engine.config.scheduler.max_num_seqs
    step_tokens = engine.config.scheduler.max_num_batched_tokens
    long_len = max(1, min(step_tokens, engine.max_model_len - 8))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 1000) for _ in range(long_len)] for _ in range(4)]
    prompts += [[rng.randrange(100, 1000) for _ in range(32)]
                for _ in range(max_num_seqs - len(prompts))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except torch.OutOfMemoryError as exc:
        return {"ok": False, "error": f"out of memory: {exc}".splitlines()[0]}
    stats = engine.get_stats()
    return {"ok": all(len(o.outputs[0].token_ids) == 8 for o in outputs),
            "requests": len(prompts), "long_prompt_tokens": long_len,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "preemptions": stats.num_preemptions}


def run_worker(path: Path, utilization: float, num_batched_tokens: int) -> dict:
    spec = json.dumps({"path": str(path), "u": utilization, "t": num_batched_tokens})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--work-dir", default=str(ROOT / "bench" / "results" / "checkpoints"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["path"], spec["u"], spec["t"])))
        return 0

    try:
        import torch
    except ImportError:
        print("sizing_accuracy: torch is not installed; install brim[runtime] on a CUDA machine")
        return 0
    if not torch.cuda.is_available():
        print("sizing_accuracy: no CUDA GPU here; nothing to measure (run it on a GPU machine)")
        return 0

    work_dir = Path(args.work_dir)
    rows = []
    header = (f"{'model':<16} {'util':>5} {'tokens':>6} {'predicted':>10} {'measured':>10} "
              f"{'error':>7}  {'weights p/m GiB':>16}  {'non-KV p/m GiB':>15}  stress")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        path = build_checkpoint(name, work_dir)
        for utilization in UTILIZATIONS:
            for tokens in BATCHED_TOKENS:
                result = run_worker(path, utilization, tokens)
                row = {"model": name, "gpu_memory_utilization": utilization,
                       "max_num_batched_tokens": tokens, **result}
                if "error" in result:
                    print(f"{name:<16} {utilization:>5.2f} {tokens:>6}  error: {result['error']}")
                    rows.append(row)
                    continue
                predicted, measured = result["predicted"], result["measured"]
                p_blocks, m_blocks = predicted["num_gpu_blocks"], measured["num_gpu_blocks"]
                error = (p_blocks - m_blocks) / m_blocks if m_blocks else float("inf")
                row["error"] = error
                row["within_tolerance"] = abs(error) <= TOLERANCE and result["stress"]["ok"]
                rows.append(row)

                def gib(d, key):
                    return f"{d[key] / 2**30:.2f}" if key in d else "?"

                print(f"{name:<16} {utilization:>5.2f} {tokens:>6} {p_blocks:>10} {m_blocks:>10} "
                      f"{error:>+7.2%}  {gib(predicted, 'weights_bytes'):>7}/"
                      f"{gib(measured, 'weights_bytes'):<8}  {gib(predicted, 'non_kv_bytes'):>7}/"
                      f"{gib(measured, 'non_kv_bytes'):<7}  "
                      f"{'ok' if result['stress']['ok'] else 'FAILED: ' + str(result['stress'])}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"sizing_accuracy-{stamp}.json"
    out.write_text(json.dumps({"tolerance": TOLERANCE, "rows": rows}, indent=2))
    misses = [r for r in rows if not r.get("within_tolerance")]
    print(f"\n{len(rows) - len(misses)}/{len(rows)} within +-{TOLERANCE:.0%}; wrote {out}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
