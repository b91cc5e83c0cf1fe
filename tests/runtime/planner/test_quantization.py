"""Quantization in the planner (torch-free): which schemes config.json declares, what is
refused, and what quantized weights and an FP8 KV cache do to a plan (exact bytes of real
quantized checkpoints: tests/runtime/models/test_quantized.py)."""

from __future__ import annotations

import pytest
from brim.runtime.planner.facts import CheckpointFacts
from brim.runtime.planner.memory import GiB, PlanRequest, linear_shapes, plan
from brim.runtime.planner.quantization import (
    QuantizationSpec,
    checkpoint_quantization,
    dequant_workspace_bytes,
    resolve_quantization,
)

from tests.runtime.planner.conftest import config

L4 = 23034 * 2**20


def llama(quantization_config=None) -> dict:
    cfg = config("Llama-3.1-8B-Instruct")
    if quantization_config:
        cfg = {**cfg, "quantization_config": quantization_config}
    return cfg


def test_declared_schemes():
    gptq = checkpoint_quantization(llama({"quant_method": "gptq", "bits": 4, "group_size": 128,
                                          "desc_act": True, "sym": False}))
    assert gptq == QuantizationSpec("gptq", 4, 128, desc_act=True, sym=False, zero_offset=1)
    assert checkpoint_quantization(llama({"quant_method": "gptq", "bits": 8, "group_size": -1,
                                          "checkpoint_format": "gptq_v2"})).zero_offset == 0
    awq = checkpoint_quantization(llama({"quant_method": "awq", "bits": 4, "group_size": 64,
                                         "version": "GEMM", "zero_point": True}))
    assert (awq.method, awq.bits, awq.group_size) == ("awq", 4, 64)
    fp8 = checkpoint_quantization(llama({
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                            "strategy": "channel"}}}}))
    assert (fp8.method, fp8.fp8_scales) == ("fp8", "channel")
    assert checkpoint_quantization(llama()) is None


def test_resolution_against_the_request():
    assert resolve_quantization("fp8", llama()).on_load
    assert resolve_quantization(None, llama()) is None
    assert resolve_quantization("gptq", llama({"quant_method": "gptq"})).method == "gptq"
    with pytest.raises(ValueError, match=r"unsupported quantization: --quantization 'int4'"):
        resolve_quantization("int4", llama())
    with pytest.raises(ValueError, match="--quantization fp8 does not match the checkpoint"):
        resolve_quantization("fp8", llama({"quant_method": "awq"}))


def _plan(cfg, **settings):
    return plan(PlanRequest(checkpoint=CheckpointFacts(config=cfg), gpu_memory_bytes=L4,
                            max_model_len="auto", **settings))


def test_kv_bytes_halve_and_blocks_double_at_fp8():
    plain, fp8 = _plan(llama()), _plan(llama(), kv_cache_dtype="fp8")
    assert plain.kv_bytes_per_token == 2 * fp8.kv_bytes_per_token == 131072
    assert fp8.num_gpu_blocks in (2 * plain.num_gpu_blocks, 2 * plain.num_gpu_blocks + 1)
    assert (plain.max_model_len, fp8.max_model_len) == (22832, 45664)


def test_quantized_weights_from_config():
    facts = CheckpointFacts(config=llama()).model
    plain = _plan(llama())
    gptq = _plan(llama({"quant_method": "gptq", "bits": 4, "group_size": 128}))
    fp8 = _plan(llama(), quantization="fp8")
    # Decoder projections: 32 layers x (6144x4096 + 4096x4096 + 28672x4096 + 4096x14336).
    projections = 32 * sum(n * k for n, k in linear_shapes(facts))
    assert projections == 6_979_321_856
    # 4-bit: half a byte a weight, plus per 128 inputs a bf16 scale and a 4-bit zero.
    saved = 32 * sum(int(n * k * 2 - n * k / 2 - (k // 128) * n * 2.5)
                     for n, k in linear_shapes(facts))
    assert plain.weights_bytes - gptq.weights_bytes == saved
    assert fp8.weights_bytes == plain.weights_bytes - projections + 32 * sum(
        n * 4 for n, _ in linear_shapes(facts))
    assert gptq.quantization == "gptq 4-bit, group 128"
    assert 5.3 * GiB < gptq.weights_bytes < 5.8 * GiB
    # GPTQ's kernel dequantizes inside the matmul: no workspace on a GPU.
    assert gptq.activation_bytes == plain.activation_bytes
    assert fp8.activation_bytes - plain.activation_bytes == 28672 * 4096 * 2


def test_cpu_dequantization_workspace():
    spec = QuantizationSpec("awq", 4, 128)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
    assert dequant_workspace_bytes(spec, shapes, 4, "cpu") == 3072 * 576 * (4 + 4)
    assert dequant_workspace_bytes(spec, shapes, 2, "cuda") == 0
    assert dequant_workspace_bytes(None, shapes, 2, "cpu") == 0
