"""The FP8 KV cache on CPU: twice the blocks of a 16-bit cache in the same memory, and the
checkpoint's per-layer scales (the bundled model's agreement with float32 transformers is in
test_parity.py, which has the reference tokens at hand)."""

from __future__ import annotations

import pytest
import torch
from brim.runtime import LLM, SamplingParams
from brim.runtime.config import CacheConfig
from brim.runtime.engine.cache_sizing import kv_bytes_per_token
from safetensors.torch import load_file, save_file

from tests.runtime.models.test_llama import write_tokenizer
from tests.runtime.models.test_quantized import VOCAB, prompts, tiny_llama


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, VOCAB)
    return path


def _engine(path, **kwargs):
    return LLM(str(path), device="cpu", max_num_seqs=16, max_model_len=128, **kwargs).engine


@pytest.mark.parametrize("dtype,ratio", [("bfloat16", 2), ("float32", 4)])
def test_fp8_holds_more_blocks_in_the_same_memory(tiny_checkpoint, monkeypatch, dtype, ratio):
    import psutil

    class Memory:  # the same RAM for every engine: 10% of it is 81,920 bytes of KV cache
        available = 819_200

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    plain = _engine(tiny_checkpoint, dtype=dtype)
    fp8 = _engine(tiny_checkpoint, dtype=dtype, kv_cache_dtype="fp8")

    # K+V x 2 layers x 2 KV heads x head_dim 8 x bytes; blocks of 16 tokens, far below the
    # 16 x 128 tokens that would cap them.
    assert kv_bytes_per_token(fp8.config) == 2 * 2 * 2 * 8
    assert kv_bytes_per_token(plain.config) == ratio * kv_bytes_per_token(fp8.config)
    assert (plain.num_gpu_blocks, fp8.num_gpu_blocks) == (80 // ratio, 80)
    assert fp8.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert plain.runner.kv_caches[0][0].dtype == getattr(torch, dtype)


def test_unsupported_kv_cache_dtypes_are_refused():
    with pytest.raises(ValueError, match="fp8_e5m2 is not supported: brim stores an FP8 KV "
                                         "cache as e4m3"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, fp8 or one of .*'int8'"):
        CacheConfig(kv_cache_dtype="int8")


def test_checkpoint_kv_scales_are_read_per_layer(tiny_checkpoint, tmp_path):
    path = tmp_path / "scaled"
    path.mkdir()
    for f in tiny_checkpoint.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    state = load_file(path / "model.safetensors")
    # compressed-tensors' names for layer 0, AutoFP8's for layer 1
    state["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    state["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    state["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor([2.0])
    state["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor([4.0])
    save_file(state, path / "model.safetensors")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_dtype="fp8",
              num_gpu_blocks=64)
    outputs = llm.generate(prompts(), params)

    layers = llm.engine.model.layers
    assert [(a.k_scale, a.v_scale) for a in (layers[0].self_attn, layers[1].self_attn)] == \
        [(0.5, 0.25), (2.0, 4.0)]
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
