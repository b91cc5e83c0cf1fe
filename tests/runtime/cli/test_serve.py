"""`brim serve` as users run it: the README's command, its curl example, flag errors."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from brim.runtime.cli import main
from tests.serve_process import brim_serve

# The README's curl example, as JSON.
README_REQUEST = {
    "model": "SmolLM2-135M-Instruct",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32,
    "temperature": 0,
}


@pytest.mark.slow
def test_readme_command_serves_and_the_curl_example_answers(bundled_model_dir, tmp_path):
    log = tmp_path / "serve.log"
    env = {**os.environ, "BRIM_CACHE_DIR": str(bundled_model_dir.parent.parent)}
    # The README's `brim serve`, on a free loopback port instead of 0.0.0.0:8000.
    with brim_serve([], log, env=env) as (url, _):
        response = httpx.post(f"{url}/v1/chat/completions", json=README_REQUEST, timeout=120)
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
    text = log.read_text()
    assert "# GPU blocks: " in text and " tokens" in text
    assert "maximum concurrency at max_model_len" in text
    # 0.50 GiB of float32 weights, plus oneDNN's packed copy of the tied lm_head (0.11 GiB).
    assert "memory plan on cpu: weights 0.61 GiB" in text
    assert f"serving SmolLM2-135M-Instruct at {url}/v1" in text


def test_a_tensor_parallel_size_that_does_not_split_the_model_is_refused(capsys,
                                                                          bundled_model_dir):
    # Refused before any worker starts or weight loads, naming the sizes that work.
    args = ["serve", "--model", str(bundled_model_dir), "--device", "cpu"]
    assert main([*args, "-tp", "2"]) == 2
    assert capsys.readouterr().err == (
        "brim serve: tensor_parallel_size=2 does not split this model: it must divide the 9 "
        "attention heads and the MLP's 1536 features, and divide or be a multiple of the 3 KV "
        "heads. Use one of [1, 3].\n")


def test_pipeline_parallelism_is_refused_with_a_reason(capsys, bundled_model_dir):
    assert main(["serve", "--model", str(bundled_model_dir), "--device", "cpu",
                 "--pipeline-parallel-size", "2"]) == 2
    assert capsys.readouterr().err == (
        "brim serve: pipeline_parallel_size=2 is not supported: brim splits a model over "
        "devices with tensor parallelism only. Use pipeline_parallel_size=1 and "
        "tensor_parallel_size=N instead.\n")


def test_max_model_len_above_the_model_is_refused(capsys, bundled_model_dir):
    assert main(["serve", "--model", str(bundled_model_dir), "--device", "cpu",
                 "--max-model-len", "25.6k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brim serve: max_model_len=25600 is longer than the model's maximum "
                          "of 8192 tokens")


@pytest.mark.slow
def test_max_model_len_auto_shrinks_to_the_kv_cache(bundled_model_dir):
    """`auto` takes the model's limit and lowers it to what the KV cache holds (one load)."""
    import argparse

    from brim.runtime.engine.errors import KVCacheTooSmallError
    from brim.runtime.cli.serve import create_engine, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(bundled_model_dir), "--device", "cpu",
                              "--max-model-len", "auto", "--num-gpu-blocks", "16"])
    engine = create_engine(args)
    assert engine.max_model_len == engine.config.model.max_model_len == 16 * 16
    assert engine.config.scheduler.max_model_len == 256
    assert engine.config.model.derived_max_model_len == 8192
    fixed = parser.parse_args(["serve", "--model", str(bundled_model_dir), "--device", "cpu",
                               "--max-model-len", "1k", "--num-gpu-blocks", "16"])
    with pytest.raises(KVCacheTooSmallError, match="fewer than max_model_len=1000"):
        create_engine(fixed)  # an explicit length is never shortened silently


def test_a_kv_cache_too_small_leaves_the_memory_report(tmp_path, monkeypatch, capsys):
    """What the operator reads from a pod's termination message."""
    from brim.runtime.cli import serve
    from brim.runtime.engine.errors import KVCacheTooSmallError
    from brim.runtime.planner.report import MemoryReport, MemoryUse

    use = MemoryUse(gpu_memory_bytes=24 * 2**30, gpu_memory_utilization=0.9,
                    weights_bytes=16 * 2**30, activation_bytes=2**30, non_torch_bytes=2**30,
                    non_kv_bytes=18 * 2**30, num_gpu_blocks=100)
    report = MemoryReport(device="cuda", gpu_memory_utilization=0.9, block_size=16,
                          kv_bytes_per_token=131072, weights_bytes=16 * 2**30,
                          num_gpu_blocks=100, max_model_len=8192,
                          requested_max_model_len=8192, predicted=use, measured=use)

    def too_small(args):
        raise KVCacheTooSmallError(100, 16, 8192, "raise gpu_memory_utilization", report)

    monkeypatch.setattr(serve, "create_engine", too_small)
    path = tmp_path / "termination-log"
    assert main(["serve", "--memory-report-path", str(path)]) == 2
    assert "The KV cache holds 1600 tokens" in capsys.readouterr().err
    written = MemoryReport.from_json(json.loads(path.read_text()))
    assert written == report and not written.fits
    assert len(path.read_bytes()) < 4096
