"""Quantized checkpoints: GPTQ, AWQ and FP8 written by the tests' own packer
(quant_packer.py) from a tiny random Llama, served by brim, against transformers running
the dequantized weights in float32: the same greedy tokens.

Also: unsupported schemes are refused by name before a weight is read, the planner's
weight bytes are exactly what the engine holds, and `--quantization fp8` quantizes an
ordinary checkpoint while loading.
"""

from __future__ import annotations

import json

import pytest
import torch
from brim.runtime import LLM, SamplingParams
from brim.runtime.models.loader import load_model, model_weights_bytes
from brim.runtime.models.quantization.layers import Fp8Linear, PackedIntLinear
from brim.runtime.planner.facts import read_checkpoint
from brim.runtime.planner.quantization import resolve_quantization

from tests.runtime.conftest import hf_greedy
from tests.runtime.models import quant_packer
from tests.runtime.models.test_llama import write_tokenizer

VOCAB = 4096


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.1, eos_token_id=2,
                         bos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def prompts():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 23, 40)]


def brim_greedy(path, num_tokens=16, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=32,
              max_num_seqs=4, num_gpu_blocks=64, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params)], llm


SCHEMES = {
    "gptq-4bit-g32-asym-desc_act": {"scheme": "gptq", "bits": 4, "group_size": 32,
                                    "desc_act": True},
    "gptq-8bit-per-column-sym": {"scheme": "gptq", "bits": 8, "group_size": -1, "sym": True},
    "gptq_v2-4bit-g32-sym": {"scheme": "gptq", "bits": 4, "group_size": 32, "sym": True,
                             "v1": False},
    "awq-4bit-g32": {"scheme": "awq", "group_size": 32},
    "fp8-per-tensor": {"scheme": "fp8"},
    "compressed-tensors-fp8-per-channel": {"scheme": "compressed-tensors", "per_channel": True},
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_quantized_checkpoint_matches_transformers_on_dequantized_weights(tmp_path, name):
    hf_model = tiny_llama()
    path = tmp_path / name
    quant_packer.write_quantized(hf_model, path, **SCHEMES[name])
    write_tokenizer(path, VOCAB)
    want = [hf_greedy(hf_model, p, 16) for p in prompts()]

    got, llm = brim_greedy(path)

    assert got == want
    model = llm.engine.model
    layer_type = Fp8Linear if "fp8" in name else PackedIntLinear
    for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                   "mlp.down_proj"):
        assert isinstance(model.layers[0].get_submodule(module), layer_type)
    assert not isinstance(model.lm_head, (Fp8Linear, PackedIntLinear))


def test_fp8_on_load_matches_transformers_on_fp8_rounded_weights(tmp_path):
    hf_model = tiny_llama()
    path = tmp_path / "plain"
    hf_model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, VOCAB)
    with torch.no_grad():  # the reference: every projection rounded to FP8 per channel
        for name, module in hf_model.named_modules():
            if name.rpartition(".")[2] in quant_packer.LINEARS:
                module.weight.copy_(quant_packer.fp8_tensors(module.weight, True)[1])
    want = [hf_greedy(hf_model, p, 16) for p in prompts()]

    got, llm = brim_greedy(path, quantization="fp8")

    assert got == want
    assert isinstance(llm.engine.model.layers[1].mlp.down_proj, Fp8Linear)


@pytest.mark.parametrize("name", ["gptq-4bit-g32-asym-desc_act", "awq-4bit-g32",
                                  "fp8-per-tensor", "compressed-tensors-fp8-per-channel"])
def test_planner_weight_bytes_are_what_the_engine_holds(tmp_path, name):
    hf_model = tiny_llama()
    path = tmp_path / name
    quant_packer.write_quantized(hf_model, path, **SCHEMES[name])
    checkpoint = read_checkpoint(path)
    spec = resolve_quantization(None, checkpoint.config)

    model = load_model(path, checkpoint.model, "float32", "cpu", quantization=spec)

    assert checkpoint.checkpoint_weights_bytes(4, 1, spec) == model_weights_bytes(model)
    # The table the operator receives agrees with the headers.
    table = checkpoint.to_json()["weights_bytes"]
    assert table["4x1"] == model_weights_bytes(model)


def test_planner_fp8_on_load_bytes(tmp_path):
    hf_model = tiny_llama()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    checkpoint = read_checkpoint(tmp_path)
    spec = resolve_quantization("fp8", checkpoint.config)
    model = load_model(tmp_path, checkpoint.model, "bfloat16", "cpu", quantization=spec)
    expected = model_weights_bytes(model)
    assert checkpoint.checkpoint_weights_bytes(2, 1, spec) == expected
    assert checkpoint.to_json()["weights_bytes"]["fp8:2x1"] == expected
    # Projections: one byte a weight (+ a float32 scale per channel) instead of two.
    assert checkpoint.checkpoint_weights_bytes(2, 1) - expected > 0


def _config_only(tmp_path, quantization_config):
    """A checkpoint whose weights file is garbage: refusing must not read it."""
    hf_config = {**tiny_llama().config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    hf_config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    # A valid header declaring a tensor whose bytes the file does not hold.
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [VOCAB, 64], "data_offsets": [0, VOCAB * 64 * 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return tmp_path


@pytest.mark.parametrize("quantization_config,needle", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq with bits=3"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise scales"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     "4-bit int weights"),
])
def test_unsupported_schemes_are_refused_by_name_before_reading_weights(
        tmp_path, quantization_config, needle):
    path = _config_only(tmp_path, quantization_config)
    with pytest.raises(ValueError, match="unsupported quantization") as error:
        LLM(str(path), device="cpu")
    assert needle in str(error.value)
    assert "brim serves GPTQ" in str(error.value)


def test_requested_scheme_must_match_the_checkpoint(tmp_path):
    path = _config_only(tmp_path, quant_packer.quantization_config("gptq"))
    with pytest.raises(ValueError, match="--quantization awq does not match the checkpoint, "
                                         "whose config.json declares gptq"):
        LLM(str(path), device="cpu", quantization="awq")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(
        {**tiny_llama().config.to_dict(), "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="--quantization gptq needs a checkpoint quantized "
                                         "with GPTQ"):
        LLM(str(plain), device="cpu", quantization="gptq")


BUNDLED_SCHEMES = {
    # SmolLM2's 576 inputs make a partial last group of 64 rows at group size 128.
    "gptq-4bit-g128-asym-desc_act": {"scheme": "gptq", "bits": 4, "group_size": 128,
                                     "desc_act": True},
    "awq-4bit-g64": {"scheme": "awq", "group_size": 64},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUNDLED_SCHEMES))
def test_bundled_model_quantized_matches_transformers(bundled_model_dir, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from tests.runtime.engine.test_parity import CHAT_PROMPTS, RAW_PROMPTS

    hf_model = AutoModelForCausalLM.from_pretrained(bundled_model_dir,
                                                    dtype=torch.float32).eval()
    path = tmp_path / name
    quant_packer.write_quantized(hf_model, path, **BUNDLED_SCHEMES[name],
                                 tokenizer_from=bundled_model_dir)
    # 8 new tokens: every weight is dequantized once per step on CPU (a few seconds each).
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", device="cpu")
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for c in CHAT_PROMPTS] + [tokenizer.encode(p) for p in RAW_PROMPTS]

    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    want = [hf_greedy(hf_model, p, 8) for p in prompts]
    assert got == want
