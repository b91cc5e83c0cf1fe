"""Plans: exact arithmetic, monotone, self-consistent, autos and advice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from brim.runtime.sizing import (
    CUDA_CONTEXT_BYTES,
    GiB,
    LIBRARY_WORKSPACE_BYTES,
    NCCL_BYTES_PER_PEER,
    CUBLAS_WORKSPACE_BYTES,
    SAMPLER_BYTES_PER_LOGIT,
    plan,
)

CONFIGS = Path(__file__).parent.parent / "data" / "configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


SMOL = config("SmolLM2-135M-Instruct")
LLAMA = config("Meta-Llama-3-8B-Instruct")


def test_plan_exact_arithmetic():
    p = plan(SMOL, gpu_memory_bytes=80 * GiB)  # float32 (the config's dtype), 0.90
    # Parameters in float32, plus the RoPE table: 8192 positions x (cos, sin) x 64 x 4 bytes.
    weights = 134_515_008 * 4 + 8192 * 2 * 64 * 4
    non_torch = CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES
    # Logits dominate this small model: final hidden [8192, 576] fp32 plus 256 sampled rows
    # over 49152 logits in fp32 and the sampler's work.
    activations = (CUBLAS_WORKSPACE_BYTES + 8192 * 576 * 4
                   + 256 * 49152 * (4 + SAMPLER_BYTES_PER_LOGIT))
    non_kv = weights + non_torch + activations
    block_bytes = 46080 * 16
    blocks = (int(80 * GiB * 0.90) - non_kv) // block_bytes
    assert (p.weights_bytes, p.weights_source) == (weights, "config")
    assert (p.non_torch_bytes, p.activation_bytes, p.cuda_graph_bytes) == (non_torch,
                                                                          activations, 0)
    assert p.non_kv_bytes == non_kv
    assert p.num_gpu_blocks == blocks
    assert p.kv_cache_tokens == blocks * 16
    assert p.kv_cache_bytes == blocks * block_bytes
    assert p.max_model_len == p.derived_max_model_len == 8192
    assert p.max_concurrency == blocks // 512
    assert p.fits


def test_plan_mlp_peak_for_a_wide_model():
    # Llama-3-8B at 8192 tokens: the MLP's [T, 3h] + [T, 4I] bf16 outweighs the logits.
    p = plan(LLAMA, gpu_memory_bytes=80 * GiB)
    assert p.activation_bytes == CUBLAS_WORKSPACE_BYTES + 8192 * (3 * 4096 + 4 * 14336) * 2


def test_more_memory_gives_more_blocks():
    blocks = [plan(LLAMA, gpu_memory_bytes=gib * GiB).num_gpu_blocks for gib in (24, 40, 48, 80,
                                                                                  141)]
    assert blocks == sorted(blocks) and len(set(blocks)) == len(blocks)


@pytest.mark.parametrize("name", ["Meta-Llama-3-8B-Instruct", "SmolLM2-135M-Instruct",
                                  "chatglm3-6b", "mpt-7b"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_plan_is_self_consistent(name, block_size):
    p = plan(config(name), gpu_memory_bytes=40 * GiB, block_size=block_size)
    assert p.kv_cache_tokens == p.num_gpu_blocks * block_size
    assert p.kv_cache_bytes == p.kv_cache_tokens * p.kv_bytes_per_token
    assert p.non_kv_bytes == (p.weights_bytes + p.non_torch_bytes + p.activation_bytes
                              + p.cuda_graph_bytes)
    assert p.non_kv_bytes + p.kv_cache_bytes <= int(p.gpu_memory_bytes * 0.90)
    assert p.non_kv_bytes + p.kv_cache_bytes + block_size * p.kv_bytes_per_token > \
        int(p.gpu_memory_bytes * 0.90)


def test_auto_max_model_len_is_the_longest_that_fits():
    big = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len="auto")
    assert big.fits and big.max_model_len < big.derived_max_model_len
    assert big.max_model_len == big.num_gpu_blocks * 16
    longer = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB,
                  max_model_len=big.max_model_len + 16)
    assert not longer.fits


def test_auto_max_model_len_capped_by_derived():
    assert plan(LLAMA, gpu_memory_bytes=80 * GiB, max_model_len="auto").max_model_len == 8192


def test_auto_max_model_len_with_min_concurrency():
    p = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len="auto",
             min_concurrency=4)
    assert p.fits and p.max_concurrency >= 4
    assert p.max_model_len == (p.num_gpu_blocks // 4) * 16


def test_auto_utilization_is_the_smallest_that_fits():
    p = plan(LLAMA, gpu_memory_bytes=24 * GiB, gpu_memory_utilization="auto", min_concurrency=2)
    assert p.fits and p.gpu_memory_utilization <= 0.95
    below = plan(LLAMA, gpu_memory_bytes=24 * GiB, min_concurrency=2,
                 gpu_memory_utilization=round(p.gpu_memory_utilization - 0.01, 2))
    assert not below.fits


def test_auto_tensor_parallel_picks_the_smallest_that_fits():
    t4 = 15360 * 2**20
    one = plan(LLAMA, gpu_memory_bytes=t4, dtype="float16")
    assert not one.fits
    p = plan(LLAMA, gpu_memory_bytes=t4, dtype="float16", tensor_parallel_size="auto")
    assert (p.tensor_parallel_size, p.fits) == (2, True)
    assert p.kv_bytes_per_token == 65536
    assert p.non_torch_bytes == CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES + NCCL_BYTES_PER_PEER


def test_auto_tensor_parallel_respects_kv_heads_and_gpus():
    # SmolLM2 has 3 KV heads: only TP=1 divides them.
    assert plan(SMOL, gpu_memory_bytes=2 * GiB,
                tensor_parallel_size="auto").tensor_parallel_size == 1
    t4 = 15360 * 2**20
    p = plan(LLAMA, gpu_memory_bytes=t4, dtype="float16", tensor_parallel_size="auto", num_gpus=1)
    assert (p.tensor_parallel_size, p.fits) == (1, False)


def test_not_fitting_says_why_and_what_would_fit():
    p = plan(LLAMA, gpu_memory_bytes=24 * GiB, max_model_len="32k", min_concurrency=1)
    assert not p.fits
    assert "longer than the model's maximum of 8192" in p.messages[0]
    q = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len=32768,
             num_gpus=2)
    assert not q.fits
    text = "\n".join(q.messages)
    assert f"only {q.num_gpu_blocks} blocks" in text and "needs 2048 blocks" in text
    lower = int(re.search(r"lower max_model_len to (\d+)", text).group(1))
    assert plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB,
                max_model_len=lower).fits
    assert "use tensor_parallel_size=2" in text
    assert plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len=32768,
                tensor_parallel_size=2).fits


def test_advice_to_raise_utilization_fits():
    # Choose a length that fits at 0.95 but not at 0.90.
    at_95 = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len="auto",
                 gpu_memory_utilization=0.95)
    p = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB,
             max_model_len=at_95.max_model_len)
    assert not p.fits
    u = float(re.search(r"raise gpu_memory_utilization to (0\.\d\d)", "\n".join(p.messages))[1])
    assert 0.90 < u <= 0.95
    assert plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB,
                max_model_len=at_95.max_model_len, gpu_memory_utilization=u).fits


def test_weights_alone_too_large():
    p = plan(LLAMA, gpu_memory_bytes=8 * GiB)
    assert not p.fits and p.num_gpu_blocks == 0
    assert "non-KV memory needs" in p.messages[0] and "budget is 7.20 GiB" in p.messages[0]


def test_cuda_graphs_add_memory_when_captured():
    eager = plan(LLAMA, gpu_memory_bytes=80 * GiB)
    graphs = plan(LLAMA, gpu_memory_bytes=80 * GiB, enforce_eager=False)
    # Decode batches 1, 2, 4 and 8..256 step 8: 35 graphs x 32 layers x 256 KiB.
    assert graphs.cuda_graph_bytes == 35 * 32 * 256 * 2**10
    assert graphs.num_gpu_blocks < eager.num_gpu_blocks


def test_plan_reads_a_checkpoint_folder(tmp_path):
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    cfg = {**SMOL, "num_hidden_layers": 1, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    save_file({"model.embed_tokens.weight": np.zeros((128, 576), np.float32)},
              str(tmp_path / "model.safetensors"))
    p = plan(tmp_path, gpu_memory_bytes=16 * GiB, dtype="bfloat16")
    rope_table = 8192 * 2 * 64 * 4  # SmolLM2's max_position_embeddings x (cos, sin) x fp32
    assert (p.weights_source, p.weights_bytes) == ("safetensors", 128 * 576 * 2 + rope_table)
    assert p.derived_max_model_len == 4096
    assert p.kv_bytes_per_token == 2 * 1 * 3 * 64 * 2


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        plan(tmp_path, gpu_memory_bytes=GiB)


def test_tensor_parallel_must_divide_heads():
    with pytest.raises(ValueError, match=r"divide the model's 9 attention heads; use one of \[1\]"):
        plan(SMOL, gpu_memory_bytes=80 * GiB, tensor_parallel_size=2)
