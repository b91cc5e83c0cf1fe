"""Online serving against a peer: `brim serve` against vLLM's OpenAI server, same load tool.

Each server runs alone (one after the other, in each round), on the bundled
SmolLM2-135M-Instruct, float32 by default, both given 2 cores and the same max_num_seqs, prefix
caching on. The load comes from a tool neither project wrote: guidellm (in a venv of its
own under the cache folder, made on first use), synthetic prompts of --prompt-tokens tokens
asking for --output-tokens tokens on /v1/completions, streamed, one phase per concurrency
level (--concurrency, default 1 8 32 128), each --duration seconds after guidellm's own
warm-up. Every phase gets a fresh seed, so no phase reuses another's prompts through the
prefix cache.

Around each phase the bench records CPU seconds: the server's process tree, guidellm's, and
everyone else's (the machine's busy time minus both): a phase whose outside load exceeds
--max-outside-load cores is marked discarded and left out of the ratios.

The serving-path overhead: brim's offline engine runs the same shape (a --prompt-tokens
prompt, --output-tokens tokens, sampled at temperature 1 as the server samples guidellm's
requests, which name no temperature) in a process of its own that stays loaded for the round.
It runs a block of --offline-requests requests right before brim's concurrency-1 phase and
right after it; then come --overhead-phases shorter concurrency-1 phases, each followed by
another block, so every served phase has an offline block on each side (the server up and
idle while a block runs). Both sides use guidellm's definition of inter-token latency: per
request, (last token - first token) / (tokens - 1), and the median over requests. Each served
phase's ITL p50 against the mean of its two neighbours is one pair; the median over all pairs
is the serving overhead: what the HTTP path adds, and the load client's own CPU use, which
this 2-core machine shares. The pairs are short and interleaved because this machine's speed
drifts by 10-20% within minutes.

    .venv/bin/python bench/serving.py [--rounds 2] [--concurrency 1 8 32 128] [--engines brim vllm]

Prints a table and writes bench/results/serving-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:
    sys.path.append(_BENCH)  # appended, never prepended
import _peer_common as common  # noqa: E402

GUIDELLM_VERSION = "0.8.1"
GUIDELLM_ATTEMPTS = 3  # tries per phase when guidellm hangs (killed, run again)
SERVED_NAME = "SmolLM2-135M-Instruct"
ENGINES = ("brim", "vllm")


# -- guidellm -----------------------------------------------------------------------------

def default_guidellm_venv() -> Path:
    return common.default_vllm_venv().parent / f"guidellm-{GUIDELLM_VERSION}"


def ensure_guidellm(venv: Path, log=sys.stderr) -> Path:
    """guidellm's command in its venv, installed on first use (torch pinned to the local CPU
    wheel, which guidellm's data loader imports; a looser pin downloads a CUDA build)."""
    exe = venv / "bin" / "guidellm"
    if exe.is_file():
        return exe
    print(f"creating the guidellm venv at {venv} (once)", file=log)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", f"guidellm=={GUIDELLM_VERSION}",
                    common.TORCH_SPEC], check=True)
    return exe


def guidellm_phase(exe: Path, port: int, model_dir: Path, concurrency: int, seed: int,
                   args, out_json: Path, duration: int) -> subprocess.CompletedProcess:
    cmd = [str(exe), "run",
           "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},"
                        f"request_format=/v1/completions,model={SERVED_NAME}",
           "--profile", f"kind=concurrent,streams={concurrency}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                     f"output_tokens={args.output_tokens}",
           "--constraint", f"kind=max_duration,seconds={duration}",
           "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
           "--seed", f"kind=static,value={seed}",
           "--output", f"kind=json,path={out_json}",
           "--disable-console"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Its own session, so that a hang takes its whole process tree down with it: guidellm's
    # forked data-loader workers can deadlock at exit (seen once in ~40 phases, 2026-11-29:
    # a worker stuck joining a queue's feeder thread after the phase's requests were served).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=out_json.parent, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=duration * 3 + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_guidellm(path: Path) -> dict:
    """The figures a phase reports, from guidellm's JSON (successful requests)."""
    bench = json.loads(path.read_text())["benchmarks"][0]
    m = bench["metrics"]

    def dist(name):
        d = m[name]["successful"]
        pct = d.get("percentiles") or {}
        return {"mean": d.get("mean"), "p50": d.get("median"), "p90": pct.get("p90"),
                "p99": pct.get("p99")}

    totals = m["request_totals"]
    return {
        "output_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
        "requests": {k: totals.get(k) for k in ("successful", "errored", "incomplete")},
        "ttft_ms": dist("time_to_first_token_ms"),
        "itl_ms": dist("inter_token_latency_ms"),
        "tpot_ms": dist("time_per_output_token_ms"),
        "output_tokens_per_request": m["output_token_count"]["successful"].get("median"),
    }


# -- servers ------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, args, port: int, model_dir: Path, vllm_python: Path | None):
    common_flags = ["--port", str(port), "--host", "127.0.0.1", "--dtype", args.dtype,
                    "--max-num-seqs", str(args.max_num_seqs),
                    "--served-model-name", SERVED_NAME, "--enable-prefix-caching"]
    if engine == "brim":
        brim = Path(sys.executable).parent / "brim"
        return [str(brim), "serve", "--model", str(model_dir), *common_flags], {}
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}" if args.threads > 1 else "0",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    preload = common.vllm_preload(args.vllm_venv)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), *common_flags], env


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def warm_up(port: int, vocab_size: int) -> None:
    """A few requests outside any phase's prompts (compiles, caches, first-request costs)."""
    rng = random.Random(12345)
    for n in (32, 200, 256):
        body = json.dumps({"model": SERVED_NAME, "prompt": [rng.randrange(100, vocab_size)
                                                           for _ in range(n)],
                           "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tree_cpu(pid: int) -> float:
    table = common._processes()
    return sum(table[p][2] for p in common._tree(table, pid) if p in table)


def measure_phase(engine: str, proc: subprocess.Popen, port: int, model_dir: Path, exe: Path,
                  workdir: Path, args, concurrency: int, duration: int, tag: str) -> dict:
    """One guidellm phase against the running server, with the CPU accounting around it."""
    for attempt in range(GUIDELLM_ATTEMPTS):
        seed = random.SystemRandom().randrange(1, 2**31)
        common.wait_for_quiet(args.max_outside_load, args.wait_for_quiet)
        out_json = workdir / f"{engine}-{tag}-c{concurrency}.json"
        server_start = tree_cpu(proc.pid)
        busy_start, _ = common._system_cpu_seconds()
        children_start = sum(os.times()[2:4])
        self_start = sum(os.times()[:2])
        wall_start = time.perf_counter()
        try:
            done = guidellm_phase(exe, port, model_dir, concurrency, seed, args, out_json,
                                  duration)
            break
        except subprocess.TimeoutExpired:
            print(f"[{engine} {tag}] c={concurrency}: guidellm hung (killed after "
                  f"{time.perf_counter() - wall_start:.0f} s); the phase runs again",
                  flush=True)
    else:
        raise RuntimeError(f"guidellm hung {GUIDELLM_ATTEMPTS} times in a row")
    wall = time.perf_counter() - wall_start
    busy = common._system_cpu_seconds()[0] - busy_start
    server_cpu = tree_cpu(proc.pid) - server_start
    tool_cpu = sum(os.times()[2:4]) - children_start
    own_cpu = sum(os.times()[:2]) - self_start
    outside = max(busy - server_cpu - tool_cpu - own_cpu, 0.0)
    if done.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"guidellm failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    figures = read_guidellm(out_json)
    discarded = outside / wall > args.max_outside_load
    errors = figures["requests"].get("errored") or 0
    print(f"[{engine} {tag}] c={concurrency}: {figures['output_tok_s']:.1f} out tok/s, "
          f"TTFT p50 {figures['ttft_ms']['p50']:.0f} ms, ITL p50 "
          f"{figures['itl_ms']['p50']:.1f} ms, server CPU {server_cpu:.0f} s / "
          f"{wall:.0f} s, outside {outside / wall:.2f} cores"
          + (", DISCARDED" if discarded else "") + (f", {errors} errors" if errors else ""),
          flush=True)
    return {"concurrency": concurrency, "seed": seed, "duration_s": duration,
            "wall_s": round(wall, 1), "server_cpu_s": round(server_cpu, 1),
            "guidellm_cpu_s": round(tool_cpu, 1), "outside_cores": round(outside / wall, 3),
            "discarded": discarded, **figures}


def run_server(engine: str, args, model_dir: Path, exe: Path, workdir: Path, round_: int,
               vllm_python: Path | None, reference=None) -> dict:
    """One server's phases. reference: a callable giving an OfflineReference; with it, the
    concurrency-1 phase is followed by --overhead-phases shorter ones, and the offline engine
    runs between them (the server up and idle), so that every served phase has an offline
    block right before and right after it."""
    port = free_port()
    cmd, env = server_command(engine, args, port, model_dir, vllm_python)
    log_path = workdir / f"{engine}-round{round_}.log"
    offline = reference() if reference is not None else None
    with open(log_path, "w") as log:
        # Started from the work folder (outside the repository: its operator/ would shadow the
        # standard library for vLLM), in a process group of its own so stop() gets them all.
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)
    phases, overhead = [], None
    try:
        if offline is not None:
            offline.wait_ready()
        wait_healthy(port, proc, args.start_timeout)
        warm_up(port, args.vocab_size)
        for concurrency in args.concurrency:
            paired = concurrency == 1 and offline is not None
            if paired:
                overhead = {"offline": [offline.run()], "served": []}
            phase = measure_phase(engine, proc, port, model_dir, exe, workdir, args, concurrency,
                                  args.duration, f"r{round_}")
            phases.append(phase)
            if not paired:
                continue
            overhead["served"].append(phase)
            overhead["offline"].append(offline.run())
            for k in range(args.overhead_phases):
                overhead["served"].append(measure_phase(
                    engine, proc, port, model_dir, exe, workdir, args, 1,
                    args.overhead_duration, f"r{round_}-overhead{k}"))
                overhead["offline"].append(offline.run())
    finally:
        stop(proc)
        if offline is not None:
            offline.close()
    result = {"engine": engine, "round": round_, "log": str(log_path), "phases": phases}
    if overhead is not None:
        result["overhead"] = overhead
    return result


# -- the offline reference ----------------------------------------------------------------

def request_itl_ms(stamps: list[float]) -> float:
    """A request's inter-token latency as guidellm defines it (request_stats.py in 0.8.1):
    (last token's time - first token's time) / (tokens - 1), one mean per request."""
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)


def offline_worker(spec: dict) -> None:
    """brim's engine, in process, on the concurrency-1 shape, one block of requests per line
    read from stdin ("<n>"; "quit" ends); one JSON line per block on the original stdout:
    the block's per-request inter-token latencies and the outside load during it."""
    import torch

    from brim.runtime.engine.engine import Engine
    from brim.runtime.config import EngineConfig
    from brim.runtime.sampling_params import SamplingParams

    # Whatever else prints to stdout (a library's warning) goes to stderr, the log.
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(spec["threads"])
    # What `brim serve` builds for the bench's flags.
    engine = Engine(EngineConfig.create(spec["model"], dtype=spec["dtype"],
                                        max_num_seqs=spec["max_num_seqs"],
                                        enable_prefix_caching=True))
    rng = random.Random(99)
    counter = iter(range(1 << 30))

    def one_request() -> tuple[float, list[float]]:
        prompt = [rng.randrange(100, spec["vocab_size"]) for _ in range(spec["prompt_tokens"])]
        # What the server makes of guidellm's request (no temperature named): the OpenAI
        # default, 1.0, so the sampler's cost is on both sides of the comparison.
        engine.add_request(str(next(counter)), prompt, SamplingParams(
            max_tokens=spec["output_tokens"], temperature=1.0, ignore_eos=True))
        stamps, start = [], time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            stamps.append(time.perf_counter())
        return start, stamps

    for _ in range(2):  # warm-up: compiles, caches, first-request costs
        one_request()
    results.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        ttfts, itls, steps = [], [], []
        with common.CpuWindow() as window:
            for _ in range(int(line)):
                start, stamps = one_request()
                ttfts.append((stamps[0] - start) * 1000)
                itls.append(request_itl_ms(stamps))
                steps.extend((b - a) * 1000 for a, b in zip(stamps, stamps[1:]))
        results.write(json.dumps({
            "requests": len(itls), "itl_ms_p50": statistics.median(itls), "itl_ms": itls,
            "ttft_ms_p50": statistics.median(ttfts), "step_ms_p50": statistics.median(steps),
            "outside_cores": round(window.load.outside_cores, 3),
            "wall_s": round(window.load.wall_s, 1)}) + "\n")


class OfflineReference:
    """brim's offline engine in a process of its own, kept loaded across a round's blocks."""

    def __init__(self, args, model_dir: Path, workdir: Path) -> None:
        self.args = args
        spec = {"engine": "brim-offline", "model": str(model_dir), "dtype": args.dtype,
                "max_num_seqs": args.max_num_seqs, "threads": args.threads,
                "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                "vocab_size": args.vocab_size}
        spec_path = workdir / "brim-offline.spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log = open(workdir / "brim-offline.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", str(spec_path)],
            cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, bufsize=1)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the offline worker exited ({self.proc.poll()}); see "
                               f"{self.log.name}")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._read()

    def run(self) -> dict:
        common.wait_for_quiet(self.args.max_outside_load, self.args.wait_for_quiet)
        self.proc.stdin.write(f"{self.args.offline_requests}\n")
        block = self._read()
        block["discarded"] = block["outside_cores"] > self.args.max_outside_load
        print(f"[brim offline] {block['requests']} requests: ITL p50 {block['itl_ms_p50']:.1f} "
              f"ms (per step {block['step_ms_p50']:.1f}), outside {block['outside_cores']:.2f} "
              "cores" + (", DISCARDED" if block["discarded"] else ""), flush=True)
        return block

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- main -------------------------------------------------------------------------------------

def summarize(results: list[dict], concurrency: list[int]) -> dict:
    """Per engine and level: the median over kept rounds of each figure."""
    table = {}
    for engine in ENGINES:
        for c in concurrency:
            kept = [ph for r in results if r["engine"] == engine for ph in r["phases"]
                    if ph["concurrency"] == c and not ph["discarded"]]
            if not kept:
                continue
            table[f"{engine}@{c}"] = {
                "rounds": len(kept),
                "output_tok_s": statistics.median(ph["output_tok_s"] for ph in kept),
                "ttft_p50_ms": statistics.median(ph["ttft_ms"]["p50"] for ph in kept),
                "itl_p50_ms": statistics.median(ph["itl_ms"]["p50"] for ph in kept),
                "itl_p90_ms": statistics.median(ph["itl_ms"]["p90"] or 0 for ph in kept),
                "server_cpu_s": statistics.median(ph["server_cpu_s"] for ph in kept),
                "wall_s": statistics.median(ph["wall_s"] for ph in kept),
            }
    return table


def serving_overhead(results: list[dict]) -> dict | None:
    """Each of brim's concurrency-1 phases against the offline blocks right before and right
    after it (their mean), both as guidellm measures inter-token latency; the median over
    every such pair in every round. A pair with a discarded side is left out."""
    pairs = []
    for result in results:
        overhead = result.get("overhead")
        if result["engine"] != "brim" or not overhead:
            continue
        blocks = overhead["offline"]
        for i, phase in enumerate(overhead["served"]):
            before, after = blocks[i], blocks[i + 1] if i + 1 < len(blocks) else None
            if (after is None or phase["discarded"] or before["discarded"]
                    or after["discarded"] or not phase["itl_ms"]["p50"]):
                continue
            offline_ms = (before["itl_ms_p50"] + after["itl_ms_p50"]) / 2
            pairs.append({"round": result["round"], "phase": i,
                          "server_itl_p50_ms": phase["itl_ms"]["p50"],
                          "offline_itl_p50_ms": offline_ms,
                          "overhead_fraction": phase["itl_ms"]["p50"] / offline_ms - 1})
    if not pairs:
        return None
    return {"pairs": pairs,
            "overhead_fraction": statistics.median(p["overhead_fraction"] for p in pairs)}


def main() -> int:
    from brim.runtime.models.bundled import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=40, help="seconds per phase")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-outside-load", type=float, default=0.15,
                        help="cores other processes may use during a phase")
    parser.add_argument("--wait-for-quiet", type=float, default=30)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=4)
    parser.add_argument("--vllm-venv", type=Path, default=common.default_vllm_venv())
    parser.add_argument("--guidellm-venv", type=Path, default=default_guidellm_venv())
    parser.add_argument("--no-offline", action="store_true",
                        help="skip the offline reference (and the serving-overhead figure)")
    parser.add_argument("--overhead-phases", type=int, default=5,
                        help="short concurrency-1 phases after the main one, each with an "
                             "offline block after it (the serving-overhead pairs)")
    parser.add_argument("--overhead-duration", type=int, default=10,
                        help="seconds per overhead phase")
    parser.add_argument("--offline-requests", type=int, default=3,
                        help="requests per offline block")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        offline_worker(common.read_spec(sys.argv))
        return 0

    model_dir = bundled_model_path()
    args.vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    exe = ensure_guidellm(args.guidellm_venv)
    vllm_python = common.ensure_vllm_venv(args.vllm_venv) if "vllm" in args.engines else None
    workdir = Path(tempfile.mkdtemp(prefix="brim-serving-"))
    print(f"work folder (server logs, guidellm reports): {workdir}", flush=True)

    results = []
    for round_ in range(args.rounds):
        for engine in args.engines:
            reference = (functools.partial(OfflineReference, args, model_dir, workdir)
                         if engine == "brim" and not args.no_offline and 1 in args.concurrency
                         else None)
            results.append(run_server(engine, args, model_dir, exe, workdir, round_,
                                      vllm_python, reference))
    table = summarize(results, args.concurrency)
    ratios = {}
    for c in args.concurrency:
        b, v = table.get(f"brim@{c}"), table.get(f"vllm@{c}")
        # A level where no request finished within the phase (too short for it) has no
        # figures to compare.
        if b and v and v["output_tok_s"] and v["itl_p50_ms"] and v["ttft_p50_ms"]:
            ratios[c] = {"output_tok_s": b["output_tok_s"] / v["output_tok_s"],
                         "itl_p50": b["itl_p50_ms"] / v["itl_p50_ms"],
                         "ttft_p50": b["ttft_p50_ms"] / v["ttft_p50_ms"]}
    overhead = serving_overhead(results)
    print(f"\n{'level':>6} {'engine':>6} {'out tok/s':>10} {'TTFT p50':>9} {'ITL p50':>8} "
          f"{'ITL p90':>8} {'srv CPU/wall':>12}")
    for key, row in table.items():
        engine, c = key.split("@")
        print(f"{c:>6} {engine:>6} {row['output_tok_s']:>10.1f} {row['ttft_p50_ms']:>7.0f}ms "
              f"{row['itl_p50_ms']:>6.1f}ms {row['itl_p90_ms']:>6.1f}ms "
              f"{row['server_cpu_s'] / row['wall_s']:>12.2f}")
    for c, r in ratios.items():
        print(f"c={c}: brim/vLLM output tok/s {r['output_tok_s']:.2f}x, ITL p50 "
              f"{r['itl_p50']:.2f}x, TTFT p50 {r['ttft_p50']:.2f}x")
    if overhead:
        for row in overhead["pairs"]:
            print(f"serving overhead at c=1, round {row['round']} phase {row['phase']}: ITL p50 "
                  f"{row['server_itl_p50_ms']:.1f} ms vs offline "
                  f"{row['offline_itl_p50_ms']:.1f} ms: {row['overhead_fraction'] * 100:+.1f}%")
        print(f"serving overhead at c=1 (median of {len(overhead['pairs'])} pairs): "
              f"{overhead['overhead_fraction'] * 100:+.1f}%")
    record = {"utc": common.utc_stamp(), "commit": common.git_commit(),
              "machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
              "versions": {"brim": common.venv_versions(Path(sys.executable)),
                           **({"vllm": common.venv_versions(vllm_python)} if vllm_python else {}),
                           "guidellm": GUIDELLM_VERSION},
              "results": results,
              "summary": table,
              "ratios": {str(c): r for c, r in ratios.items()}, "overhead": overhead}
    path = common.write_results("serving", record)
    print(f"wrote {path}")
    shutil.rmtree(workdir, ignore_errors=True) if not os.environ.get("BRIM_KEEP_WORK") else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
