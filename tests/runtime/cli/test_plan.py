"""`brim plan`: flags, table, JSON, exit codes; the dispatcher imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from brim.runtime.cli import main

CONFIGS = Path(__file__).parents[2] / "data" / "configs"
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


def test_tensor_parallel_size_from_the_command_line(capsys):
    # Llama-3-8B: 32 heads, 8 KV heads, MLP 14336. At -tp 4 each GPU holds 2 KV heads.
    code, out, _ = run(capsys, "--config", LLAMA, "--gpu", "L4", "-tp", "4", "--json")
    assert code == 0 and json.loads(out)["kv_bytes_per_token"] == 131072 // 4
    code, _, err = run(capsys, "--config", LLAMA, "--gpu", "L4", "-tp", "3")
    assert code == 2 and "Use one of [1, 2, 4, 8, 16, 32]" in err


def test_planner_and_cli_import_no_torch(tmp_path):
    """The operator image has no torch: the planner, the config and the `brim` dispatcher
    (every subcommand's parser, `brim plan` run to the end) must not import it."""
    code = (
        "import sys\n"
        "import brim.runtime.planner, brim.runtime.config\n"
        "from brim.runtime.cli import build_parser, main\n"
        "for command in ('generate', 'serve', 'plan'):\n"
        "    build_parser([command])\n"
        "build_parser([])\n"
        f"assert main(['plan', '--config', {LLAMA!r}, '--gpu', 'L4', '--json']) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'numpy', 'safetensors')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    # From an empty folder: the repository root on sys.path would shadow stdlib `operator`.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   stdout=subprocess.DEVNULL)


def test_fp8_weights_and_kv_cache_on_an_l4(capsys):
    """Llama-3.1-8B on one L4: bf16 KV holds 22,832 tokens; FP8 KV twice that; FP8 weights
    too leave room for the model's whole 128k context."""
    config = str(CONFIGS / "Llama-3.1-8B-Instruct.json")
    lengths = []
    for extra in ([], ["--kv-cache-dtype", "fp8"],
                  ["--kv-cache-dtype", "fp8", "--quantization", "fp8"]):
        code, out, _ = run(capsys, "--config", config, "--gpu", "L4", "--max-model-len",
                           "auto", "--json", *extra)
        assert code == 0
        lengths.append(json.loads(out)["max_model_len"])
    assert lengths == [22832, 45664, 131072]
    code, out, _ = run(capsys, "--config", config, "--gpu", "L4", "--quantization", "fp8")
    assert "fp8 (quantized while loading), from config" in out
    code, _, err = run(capsys, "--config", config, "--gpu", "L4", "--quantization", "gptq")
    assert code == 2 and "--quantization gptq needs a checkpoint quantized with GPTQ" in err
