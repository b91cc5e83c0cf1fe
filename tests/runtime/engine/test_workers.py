"""Tensor-parallel workers (engine/workers.py) on a tiny random Llama with gloo on CPU: seeded
sampling equals TP=1's, the ranks agree on the fewest KV blocks, a killed worker ends
`LLM.generate` and `brim serve` within seconds with an error naming its rank, and no process
outlives the engine (a clean shutdown included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import psutil
import pytest

from brim.runtime import LLM, SamplingParams
from brim.runtime.config import EngineConfig
from brim.runtime.engine.cache_sizing import size_kv_cache
from brim.runtime.engine.errors import WorkerDiedError
from brim.runtime.engine.workers import decode_step, encode_step, payload_length
from brim.runtime.engine.model_runner import StepInputs
from tests.runtime.models.test_llama import _tiny_checkpoint
from tests.serve_process import free_port, wait_healthy

ENGINE_KWARGS = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_num_seqs=8,
                     num_gpu_blocks=64)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path, _ = _tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
    return path


def _prompts():
    return [[5 + i, 900 + 7 * i, 31, 4000 + i, 77] for i in range(4)]


def test_seeded_sampling_at_tp2_equals_tp1(llama_path):
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=100 + i,
                             max_tokens=16, ignore_eos=True) for i in range(4)]
    params.append(SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=16, ignore_eos=True))
    prompts = _prompts() + [[11, 12, 13]]
    one = LLM(str(llama_path), **ENGINE_KWARGS)
    want = [[c.token_ids for c in o.outputs] for o in one.generate(prompts, params)]
    with LLM(str(llama_path), tensor_parallel_size=2, **ENGINE_KWARGS) as two:
        got = [[c.token_ids for c in o.outputs] for o in two.generate(prompts, params)]
    assert got == want
    assert len({tuple(c) for o in want for c in o}) == 6  # the seeds gave different samples
    # Leaving the `with` block stopped the worker: it exited by itself, cleanly.
    assert [p.exitcode for p in two.engine.workers.processes] == [0]
    two.shutdown()  # idempotent


def test_the_ranks_use_the_fewest_blocks_any_rank_measured(llama_path):
    # What each rank measures on CPU depends on the RAM free at that moment; the engine takes
    # the agreed (smallest) count: size_kv_cache hands its count to `agree`.
    config = EngineConfig.create(llama_path, device="cpu", max_model_len=512)
    config = replace(config, cache=replace(config.cache, num_gpu_blocks=40))
    asked = []
    report = size_kv_cache(config, None, 0, agree=lambda n: asked.append(n) or 33)
    assert asked == [40]
    assert (report.num_gpu_blocks, report.max_model_len) == (33, 512)


def test_a_step_survives_the_wire_format():
    step = StepInputs(input_ids=[5, 6, 7, 8], positions=[0, 1, 2, 16], slot_mapping=[48, 49, 50, 16],
                      block_tables=[[3, 0], [0, 1]], query_start_loc=[0, 3, 4], seq_lens=[3, 17],
                      logits_rows=[2, 3])
    header, payload = encode_step(step)
    assert payload_length(header.tolist()) == len(payload)
    assert decode_step(header.tolist(), payload.tolist()) == step


def _kill_after(pid: int, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (pid, signal.SIGKILL))
    timer.start()
    return timer


def test_a_killed_worker_ends_generate_naming_its_rank(llama_path):
    llm = LLM(str(llama_path), tensor_parallel_size=2, **ENGINE_KWARGS)
    workers = llm.engine.workers
    pids = [p.pid for p in workers.processes]
    # 8 requests of 500 tokens: several seconds of steps, killed 0.3 s in.
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    _kill_after(pids[0], 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by "
                                                  r"SIGKILL during a forward pass"):
            llm.generate(_prompts() * 2, params)
        assert time.monotonic() - started < 0.3 + 5
        assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
                   for pid in pids)
        assert all(p.exitcode is not None for p in workers.processes)
    finally:
        llm.shutdown()


def test_a_killed_worker_ends_brim_serve_naming_its_rank(llama_path, tmp_path):
    log = tmp_path / "serve.log"
    port = free_port()
    brim = os.path.join(os.path.dirname(sys.executable), "brim")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [brim, "serve", "--model", str(llama_path), "--device", "cpu", "-tp", "2",
             "--num-gpu-blocks", "64", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log, timeout=120)
        children = psutil.Process(server.pid).children(recursive=True)
        # Rank 1, the one worker of TP=2 (multiprocessing's resource tracker is the other child).
        worker = next(c for c in children if "spawn_main" in " ".join(c.cmdline()))
        body = {"model": "llama", "prompt": "t5 t6 t7", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:  # generating: kill the worker now
                    worker.send_signal(signal.SIGKILL)
                    started = time.monotonic()
                lines.append(line)
        assert any("error" in line for line in lines[1:]), lines[-3:]
        assert server.wait(timeout=20) == 1
        assert time.monotonic() - started < 20
        text = log.read_text()
        assert "brim serve: tensor-parallel worker rank 1" in text and "SIGKILL" in text
        # The other rank and multiprocessing's resource tracker are gone too. The tracker leaves on
        # its own once it reads EOF from the dead server's pipe, which can take a moment on a
        # loaded machine: give it a bounded wait rather than checking at one instant.
        _, alive = psutil.wait_procs(children, timeout=15)
        lingering = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not lingering, [c.cmdline() for c in lingering]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
