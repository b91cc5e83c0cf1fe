"""`brim plan`: flags, table, JSON, exit codes; the GPU table; torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from brim.runtime.cli import main
from brim.runtime.gpus import GPU_MEMORY_MIB, lookup_gpu, parse_memory

CONFIGS = Path(__file__).parent.parent / "data" / "configs"
LLAMA = str(CONFIGS / "Meta-Llama-3-8B-Instruct.json")
MiB, GiB = 2**20, 2**30


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_promised_keys(capsys):
    code, out, _ = run(capsys, "--config", LLAMA, "--gpu", "H100-80GB", "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("tensor_parallel_size", "gpu_memory_utilization", "derived_max_model_len",
                "max_model_len", "kv_bytes_per_token", "weights_bytes", "num_gpu_blocks",
                "kv_cache_tokens", "max_concurrency", "fits", "messages"):
        assert key in result
    assert result["gpu"] == "NVIDIA-H100-80GB-HBM3"
    assert result["gpu_memory_bytes"] == 81559 * MiB
    assert result["kv_bytes_per_token"] == 131072
    assert result["weights_bytes"] == 2 * 8_030_261_248 + 8192 * 2 * 128 * 4  # + RoPE table
    assert result["kv_cache_tokens"] == result["num_gpu_blocks"] * 16
    assert result["concurrency_at"]["8192"] == result["num_gpu_blocks"] // 512


def test_table_is_readable(capsys):
    code, out, _ = run(capsys, "--config", LLAMA, "--gpu-memory", "80GiB")
    assert code == 0
    for label in ("weights", "non-KV total", "KV cache", "blocks", "concurrency @4k",
                  "concurrency @8k", "concurrency @32k", "concurrency @max", "verdict"):
        assert label in out
    assert "131072 bytes/token" in out and "fits" in out


def test_not_fitting_exits_1_with_advice(capsys):
    code, out, _ = run(capsys, "--config", str(CONFIGS / "Qwen2-7B-Instruct.json"),
                       "--gpu-memory", "19GiB", "--max-model-len", "32k")
    assert code == 1
    assert "DOES NOT FIT" in out and "lower max_model_len to" in out


def test_autos_from_the_command_line(capsys):
    code, out, _ = run(capsys, "--config", LLAMA, "--gpu", "tesla-t4", "--dtype", "float16",
                       "--tensor-parallel-size", "auto", "--gpu-memory-utilization", "auto",
                       "--max-model-len", "auto", "--json")
    result = json.loads(out)
    assert code == 0 and result["tensor_parallel_size"] == 2 and result["fits"]
    assert result["gpu_memory_utilization"] <= 0.95


def test_model_folder(capsys, tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "gpt2.json").read_text())
    code, out, _ = run(capsys, "--model", str(tmp_path), "--gpu", "L4", "--json",
                       "--max-num-seqs", "64", "--max-num-batched-tokens", "2k",
                       "--block-size", "32", "--kv-cache-dtype", "fp8")
    result = json.loads(out)
    assert code == 0
    assert (result["max_num_seqs"], result["max_num_batched_tokens"], result["block_size"]) == (
        64, 2000, 32)
    assert result["kv_bytes_per_token"] == 2 * 12 * 12 * 64 * 1
    assert result["derived_max_model_len"] == 1024


def test_bad_input_exits_2_with_the_reason(capsys):
    code, _, err = run(capsys, "--config", LLAMA, "--gpu", "H999")
    assert code == 2 and "unknown GPU 'H999'" in err and "--gpu-memory" in err
    code, _, err = run(capsys, "--config", LLAMA, "--gpu-memory", "lots")
    assert code == 2 and "cannot read 'lots' as a memory size" in err


@pytest.mark.parametrize("name, product", [
    ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3"),
    ("h100-80gb", "NVIDIA-H100-80GB-HBM3"),
    ("H200", "NVIDIA-H200"),
    ("a100-40gb", "NVIDIA-A100-SXM4-40GB"),  # two products, same memory
    ("L4", "NVIDIA-L4"),
    ("L40", "NVIDIA-L40"),
    ("Tesla T4", "Tesla-T4"),
])
def test_gpu_lookup(name, product):
    assert lookup_gpu(name) == (product, GPU_MEMORY_MIB[product] * MiB)


def test_gpu_lookup_ambiguous():
    with pytest.raises(ValueError, match="ambiguous"):
        lookup_gpu("H100")


@pytest.mark.parametrize("text, num_bytes", [
    ("80GiB", 80 * GiB), ("81559MiB", 81559 * MiB), ("80GB", 80 * 10**9), ("81559", 81559 * MiB),
    ("1.5GiB", 3 * GiB // 2), ("80G", 80 * 10**9), ("1024B", 1024),
])
def test_parse_memory(text, num_bytes):
    assert parse_memory(text) == num_bytes


def test_plan_imports_no_torch():
    code = ("import sys, brim.runtime.sizing, brim.runtime.plan_cli, brim.runtime.gpus; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
