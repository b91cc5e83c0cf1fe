"""The memory model: KV bytes, weight bytes, plans (exact arithmetic, monotone,
self-consistent, autos and advice)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from brim.runtime.planner import facts as facts_module
from brim.runtime.planner.dtypes import (KV_CACHE_DTYPE_BYTES, MODEL_DTYPE_BYTES, resolve_dtype,
                                         resolve_kv_cache_dtype)
from brim.runtime.planner.facts import CheckpointFacts, declared_dtype, model_facts, \
    read_checkpoint
from brim.runtime.planner.memory import (
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    LIBRARY_WORKSPACE_BYTES,
    NCCL_BYTES_PER_PEER,
    SAMPLER_BYTES_PER_LOGIT,
    GiB,
    PlanRequest,
    weights_bytes_per_gpu,
)
from brim.runtime.planner.memory import plan as planner_plan
from brim.runtime.planner.memory import weights_bytes_from_config as config_weights_bytes
from tests.runtime.planner.conftest import config


def plan(model, **settings):
    """The planner on a config.json dict or a checkpoint folder."""
    checkpoint = (CheckpointFacts(config=model) if isinstance(model, dict)
                  else read_checkpoint(model))
    return planner_plan(PlanRequest(checkpoint=checkpoint, **settings))


def kv_cache_bytes_per_token(cfg: dict, kv_cache_dtype: str = "auto",
                             tensor_parallel_size: int = 1) -> int:
    """KV bytes per token as a CUDA plan resolves the dtypes."""
    dtype = resolve_dtype("auto", declared_dtype(cfg), "cuda")
    element_bytes = KV_CACHE_DTYPE_BYTES[resolve_kv_cache_dtype(kv_cache_dtype, dtype)]
    return model_facts(cfg).kv_bytes_per_token(element_bytes, tensor_parallel_size)


def _dtype_bytes(cfg: dict, dtype: str) -> int:
    return MODEL_DTYPE_BYTES[resolve_dtype(dtype, declared_dtype(cfg), "cuda")]


def weights_bytes_from_config(cfg: dict, dtype: str = "auto", tensor_parallel_size: int = 1):
    return config_weights_bytes(model_facts(cfg), _dtype_bytes(cfg, dtype), tensor_parallel_size)


def weights_bytes_from_safetensors(folder: Path, cfg: dict, dtype: str = "auto",
                                   tensor_parallel_size: int = 1):
    """Exact weight bytes of a checkpoint folder's headers (writing its config.json)."""
    (folder / "config.json").write_text(json.dumps(cfg))
    return read_checkpoint(folder).checkpoint_weights_bytes(_dtype_bytes(cfg, dtype),
                                                            tensor_parallel_size)


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
    # 9 heads, 3 KV heads, MLP 1536: 3 splits it (9 would not split the MLP).
    with pytest.raises(ValueError, match=r"must divide the 9 attention heads.*Use one of "
                                         r"\[1, 3\]"):
        plan(SMOL, gpu_memory_bytes=80 * GiB, tensor_parallel_size=2)
    assert plan(SMOL, gpu_memory_bytes=80 * GiB, tensor_parallel_size=3).tensor_parallel_size == 3


# -- KV bytes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kv_dtype, kv_bytes", [
    ("Meta-Llama-3-8B-Instruct", "auto", 131072),  # 2 x 32 x 8 x 128 x 2
    ("Mistral-7B-v0.1", "auto", 131072),  # 2 x 32 x 8 x 128 x 2
    ("gpt2", "float16", 36864),  # 2 x 12 x 12 x 64 x 2
    ("mpt-7b", "auto", 524288),  # 2 x 32 x 32 x 128 x 2
    ("chatglm3-6b", "auto", 28672),  # 2 x 28 x 2 x 128 x 2
    ("SmolLM2-135M-Instruct", "auto", 46080),  # 2 x 30 x 3 x 64 x 4 (float32)
    ("SmolLM2-135M-Instruct", "bfloat16", 23040),
    ("Qwen2-7B-Instruct", "auto", 57344),  # 2 x 28 x 4 x 128 x 2
    ("falcon-7b", "auto", 8192),  # multi-query: 2 x 32 x 1 x 64 x 2; no length key
    ("gemma-2-2b-it", "bfloat16", 106496),  # 2 x 26 x 4 x 256 x 2
    ("Phi-3-mini-4k-instruct", "auto", 393216),  # 2 x 32 x 32 x 96 x 2
    ("whisper-tiny", "auto", 12288),  # decoder: 2 x 4 x 6 x 64 x 4
    ("Meta-Llama-3-8B-Instruct", "fp8", 65536),
])
def test_kv_bytes_of_published_configs(name, kv_dtype, kv_bytes):
    cfg = config(name)
    assert kv_cache_bytes_per_token(cfg, kv_dtype) == kv_bytes


def test_kv_bytes_tensor_parallel():
    llama = config("Meta-Llama-3-8B-Instruct")
    assert kv_cache_bytes_per_token(llama, "auto", 2) == 65536
    assert kv_cache_bytes_per_token(llama, "auto", 8) == 16384
    # 2 KV groups over 4 GPUs: each keeps one group (replicated), not half of one.
    assert kv_cache_bytes_per_token(config("chatglm3-6b"), "auto", 4) == 14336


# -- weights ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [
    ("SmolLM2-135M-Instruct", 134_515_008),  # the published parameter count
    ("Meta-Llama-3-8B-Instruct", 8_030_261_248),
    ("gpt2", 124_439_808),
])
def test_parameter_count_from_config(name, params):
    assert model_facts(config(name)).num_parameters() == params
    assert weights_bytes_from_config(config(name), dtype="bfloat16") == 2 * params


def test_weights_from_config_tensor_parallel():
    llama = config("Meta-Llama-3-8B-Instruct")
    # Per GPU at TP=2: layers halved except norms; vocabulary 128256 padded to 64 and halved.
    per_layer = (4096 * (2048 + 2 * 512) + 2048 * 4096) + 3 * 4096 * 7168 + 2 * 4096
    expected = 32 * per_layer + 4096 + 2 * 64128 * 4096
    assert model_facts(llama).num_parameters_per_gpu(2) == expected
    assert weights_bytes_from_config(llama, tensor_parallel_size=2) == 2 * expected


def _write_checkpoint(folder: Path, tensors: dict) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    return path


TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 1000, "max_position_embeddings": 256, "torch_dtype": "float32",
        "tie_word_embeddings": False}


def _tiny_tensors():
    np = pytest.importorskip("numpy")
    return {
        "model.embed_tokens.weight": np.zeros((1000, 64), np.float32),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float32),
        "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 64), np.float32),
        "model.layers.0.self_attn.v_proj.weight": np.zeros((32, 64), np.float32),
        "model.layers.0.self_attn.o_proj.weight": np.zeros((64, 64), np.float32),
        "model.layers.0.mlp.gate_proj.weight": np.zeros((128, 64), np.float32),
        "model.layers.0.mlp.up_proj.weight": np.zeros((128, 64), np.float32),
        "model.layers.0.mlp.down_proj.weight": np.zeros((64, 128), np.float32),
        "model.layers.0.input_layernorm.weight": np.zeros((64,), np.float32),
        "model.layers.0.post_attention_layernorm.weight": np.zeros((64,), np.float32),
        "model.norm.weight": np.zeros((64,), np.float32),
        "lm_head.weight": np.zeros((1000, 64), np.float32),
        "step": np.zeros((3,), np.int64),  # non-float tensors keep their dtype
    }


def test_weights_from_headers_equal_tensor_bytes_reading_only_the_header(tmp_path, monkeypatch):
    tensors = _tiny_tensors()
    path = _write_checkpoint(tmp_path, tensors)
    bytes_read = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            bytes_read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(facts_module, "open", lambda p, mode="r": CountingFile(real_open(p, mode)),
                        raising=False)
    weights = weights_bytes_from_safetensors(tmp_path, TINY, dtype="float32")
    data_bytes = sum(t.nbytes for t in tensors.values())
    assert weights == data_bytes
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert sum(bytes_read) == 8 + header_length  # the header, never the tensors
    assert path.stat().st_size == 8 + header_length + data_bytes
    # The config's parameter count agrees with the file (the int64 "step" aside).
    assert weights_bytes_from_config(TINY, dtype="float32") == data_bytes - 3 * 8


def test_weights_from_headers_convert_dtype_and_shard(tmp_path):
    _write_checkpoint(tmp_path, _tiny_tensors())
    floats = sum(t.size for k, t in _tiny_tensors().items() if k != "step")
    assert weights_bytes_from_safetensors(tmp_path, TINY, dtype="bfloat16") == 2 * floats + 24
    # TP=4: embeddings and lm_head pad 1000 rows to 1024 and take 256 each; K and V split over
    # the 2 KV heads only; q, o and MLP split 4 ways; norms and the int tensor replicated.
    expected = (2 * 256 * 64 + 2 * (32 * 64 // 2) + 2 * (64 * 64 // 4) + 3 * (128 * 64 // 4)
                + 3 * 64) * 4 + 24
    assert weights_bytes_from_safetensors(tmp_path, TINY, dtype="float32",
                                          tensor_parallel_size=4) == expected


def test_weights_fall_back_to_config_without_safetensors(tmp_path):
    assert weights_bytes_from_safetensors(tmp_path, TINY) is None
    assert weights_bytes_per_gpu(read_checkpoint(tmp_path), 4) == \
        (weights_bytes_from_config(TINY), "config")


def test_weights_follow_the_safetensors_index(tmp_path):
    _write_checkpoint(tmp_path, _tiny_tensors())
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    assert weights_bytes_from_safetensors(tmp_path, TINY) == \
        sum(t.nbytes for t in _tiny_tensors().values())


# -- what the operator asks of the planner ------------------------------------------------------

def test_min_model_len_bounds_auto():
    p = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len="auto")
    assert p.fits
    at_least = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB,
                    max_model_len="auto", min_model_len=p.max_model_len)
    assert at_least.fits and at_least.max_model_len == p.max_model_len
    above = plan(config("Qwen2-7B-Instruct"), gpu_memory_bytes=19 * GiB, max_model_len="auto",
                 min_model_len=p.max_model_len + 1)
    assert not above.fits and above.min_model_len == p.max_model_len + 1
    text = "\n".join(above.messages)
    assert f"the longest max_model_len that fits is {p.max_model_len}, below min_model_len=" \
        f"{p.max_model_len + 1}" in text
    assert f"lower min_model_len to {p.max_model_len}" in text


def test_measured_memory_is_added_to_the_non_kv():
    base = plan(LLAMA, gpu_memory_bytes=21 * GiB, max_model_len="auto")
    more = plan(LLAMA, gpu_memory_bytes=21 * GiB, max_model_len="auto",
                extra_non_kv_bytes=GiB)
    assert more.non_kv_bytes == base.non_kv_bytes + GiB and more.extra_non_kv_bytes == GiB
    assert more.num_gpu_blocks == (int(21 * GiB * 0.9) - more.non_kv_bytes) // (131072 * 16)
    assert more.max_model_len < base.max_model_len
    with pytest.raises(ValueError, match="extra_non_kv_bytes must be >= 0"):
        plan(LLAMA, gpu_memory_bytes=GiB, extra_non_kv_bytes=-1)


def test_a_cpu_plan_sizes_the_container_memory():
    from brim.runtime.planner.memory import CPU_RUNTIME_BYTES

    p = plan(SMOL, gpu_memory_bytes=2 * GiB, device="cpu", max_model_len="4k",
             max_num_seqs=8)
    # float32 on CPU, the CPU step budget (8 x 4000 > 2048), no CUDA overheads.
    assert (p.dtype, p.max_num_batched_tokens, p.cuda_graph_bytes) == ("float32", 2048, 0)
    assert p.non_torch_bytes == CPU_RUNTIME_BYTES
    activations = max(2048 * (3 * 576 + 4 * 1536) * 4, 2048 * 576 * 4 + 8 * 49152 * 24)
    assert p.activation_bytes == activations  # no cuBLAS workspace
    # float32 parameters, the RoPE table, and the packed copy of the tied output projection.
    assert p.weights_bytes == (134_515_008 + 8192 * 2 * 64 + 49152 * 576) * 4
    assert p.fits and p.num_gpu_blocks == (int(2 * GiB * 0.9) - p.non_kv_bytes) // (46080 * 16)
    assert "on CPU" in p.messages[-1]
    # Each of 3 CPU ranks: a third of the KV heads, its vocabulary shard (packed twice).
    p3 = plan(SMOL, gpu_memory_bytes=2 * GiB, device="cpu", max_model_len="4k",
              max_num_seqs=8, tensor_parallel_size=3)
    assert p3.kv_bytes_per_token == 46080 // 3
    assert p3.weights_bytes < p.weights_bytes / 2
