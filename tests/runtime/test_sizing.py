"""The memory model: lengths, token counts, model facts, KV bytes, weight bytes, plans."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from brim.runtime import model_facts as facts_module
from brim.runtime.sizing import (
    CUDA_CONTEXT_BYTES,
    GiB,
    LIBRARY_WORKSPACE_BYTES,
    SAMPLER_BYTES_PER_LOGIT,
    derive_max_model_len,
    kv_cache_bytes_per_token,
    model_facts,
    parse_token_count,
    plan,
    sliding_window_of,
    weights_bytes_from_config,
    weights_bytes_from_safetensors,
    weights_bytes_per_gpu,
)

CONFIGS = Path(__file__).parent.parent / "data" / "configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# -- human-readable token counts ---------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("25.6k", 25600),  # decimal k
    ("1K", 1024),  # binary K
    ("1k", 1000),
    ("32K", 32768),
    ("2m", 2_000_000),  # decimal m
    ("1M", 1_048_576),  # binary M
    ("1g", 1_000_000_000),  # decimal g
    ("1G", 1_073_741_824),  # binary G
    ("4096", 4096),  # plain
    (" 8k ", 8000),  # surrounding spaces
    (4096, 4096),  # an int passes through
])
def test_parse_token_count(text, tokens):
    assert parse_token_count(text) == tokens


@pytest.mark.parametrize("bad", ["1.5", "abc", "0", "-5", "1kk", "", True])
def test_parse_token_count_rejects(bad):
    with pytest.raises(ValueError):
        parse_token_count(bad)


# -- length rules, one test each ---------------------------------------------------------------

def test_length_smallest_present_key():
    assert derive_max_model_len({"max_position_embeddings": 8192, "seq_length": 4096}) == 4096


def test_length_rope_linear_multiplies():
    cfg = {"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert derive_max_model_len(cfg) == 8192


def test_length_rope_dynamic_multiplies():
    cfg = {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 4}}
    assert derive_max_model_len(cfg) == 16384


def test_length_rope_yarn_multiplies_original():
    cfg = {"max_position_embeddings": 32768,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768}}
    assert derive_max_model_len(cfg) == 131072


def test_length_rope_yarn_without_original_multiplies_key():
    cfg = {"max_position_embeddings": 4096, "rope_scaling": {"type": "yarn", "factor": 2.0}}
    assert derive_max_model_len(cfg) == 8192


def test_length_rope_llama3_keeps_max_position_embeddings():
    cfg = {"max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                            "original_max_position_embeddings": 8192}}
    assert derive_max_model_len(cfg) == 131072


def test_length_rope_longrope_keeps_max_position_embeddings():
    cfg = {"max_position_embeddings": 131072,
           "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}
    assert derive_max_model_len(cfg) == 131072


def test_length_rope_parameters_default_is_unscaled():
    cfg = {"max_position_embeddings": 8192,
           "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    assert derive_max_model_len(cfg) == 8192


def test_length_rope_parameters_per_layer_type():
    cfg = {"max_position_embeddings": 4096,
           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0},
                               "sliding_attention": {"rope_type": "default"}}}
    assert derive_max_model_len(cfg) == 8192


def test_length_disabled_sliding_window_caps():
    cfg = config("Mistral-7B-v0.1")
    assert sliding_window_of(cfg) == 4096
    assert derive_max_model_len(cfg) == 32768
    assert derive_max_model_len(cfg, disable_sliding_window=True) == 4096


def test_length_disabled_sliding_window_larger_than_max_is_no_cap():
    cfg = {"max_position_embeddings": 4096, "sliding_window": 8192}
    assert derive_max_model_len(cfg, disable_sliding_window=True) == 4096


def test_length_unused_sliding_window_is_ignored():
    cfg = config("Qwen2-7B-Instruct")  # use_sliding_window: false
    assert sliding_window_of(cfg) is None
    assert derive_max_model_len(cfg, disable_sliding_window=True) == 32768


def test_length_tokenizer_model_max_length_caps():
    assert derive_max_model_len({"max_position_embeddings": 8192},
                                {"model_max_length": 2048}) == 2048


def test_length_tokenizer_sentinel_is_ignored():
    assert derive_max_model_len({"max_position_embeddings": 8192},
                                {"model_max_length": 1000000000000000019884624838656}) == 8192


def test_length_default_2048_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="brim.runtime.sizing"):
        assert derive_max_model_len({"hidden_size": 64}) == 2048
    assert "assuming max_model_len=2048" in caplog.text


# -- real published configs ----------------------------------------------------------------------

@pytest.mark.parametrize("name, kv_dtype, kv_bytes, max_len", [
    ("Meta-Llama-3-8B-Instruct", "auto", 131072, 8192),  # 2 x 32 x 8 x 128 x 2
    ("Mistral-7B-v0.1", "auto", 131072, 32768),  # 2 x 32 x 8 x 128 x 2
    ("gpt2", "float16", 36864, 1024),  # 2 x 12 x 12 x 64 x 2
    ("mpt-7b", "auto", 524288, 2048),  # 2 x 32 x 32 x 128 x 2
    ("chatglm3-6b", "auto", 28672, 8192),  # 2 x 28 x 2 x 128 x 2
    ("SmolLM2-135M-Instruct", "auto", 46080, 8192),  # 2 x 30 x 3 x 64 x 4 (float32)
    ("SmolLM2-135M-Instruct", "bfloat16", 23040, 8192),
    ("Qwen2-7B-Instruct", "auto", 57344, 32768),  # 2 x 28 x 4 x 128 x 2
    ("falcon-7b", "auto", 8192, 2048),  # multi-query: 2 x 32 x 1 x 64 x 2; no length key
    ("gemma-2-2b-it", "bfloat16", 106496, 8192),  # 2 x 26 x 4 x 256 x 2
    ("Phi-3-mini-4k-instruct", "auto", 393216, 4096),  # 2 x 32 x 32 x 96 x 2
    ("whisper-tiny", "auto", 12288, 448),  # decoder: 2 x 4 x 6 x 64 x 4
    ("Meta-Llama-3-8B-Instruct", "fp8", 65536, 8192),
])
def test_published_configs(name, kv_dtype, kv_bytes, max_len):
    cfg = config(name)
    assert kv_cache_bytes_per_token(cfg, kv_dtype) == kv_bytes
    assert derive_max_model_len(cfg) == max_len


@pytest.mark.parametrize("name, layers, heads, kv_heads, head_dim, hidden, inter, vocab, tied", [
    ("Meta-Llama-3-8B-Instruct", 32, 32, 8, 128, 4096, 14336, 128256, False),
    ("gpt2", 12, 12, 12, 64, 768, 3072, 50257, True),
    ("mpt-7b", 32, 32, 32, 128, 4096, 16384, 50432, True),
    ("chatglm3-6b", 28, 32, 2, 128, 4096, 13696, 65024, False),
    ("falcon-7b", 32, 71, 1, 64, 4544, 18176, 65024, True),
    ("gemma-2-2b-it", 26, 8, 4, 256, 2304, 9216, 256000, True),
    ("Phi-3-mini-4k-instruct", 32, 32, 32, 96, 3072, 8192, 32064, False),
    ("whisper-tiny", 4, 6, 6, 64, 384, 1536, 51865, True),
    ("SmolLM2-135M-Instruct", 30, 9, 3, 64, 576, 1536, 49152, True),
])
def test_model_facts_across_naming_schemes(name, layers, heads, kv_heads, head_dim, hidden,
                                           inter, vocab, tied):
    f = model_facts(config(name))
    assert (f.num_layers, f.num_attention_heads, f.num_kv_heads, f.head_dim, f.hidden_size,
            f.intermediate_size, f.vocab_size, f.tie_word_embeddings) == (
        layers, heads, kv_heads, head_dim, hidden, inter, vocab, tied)


def test_model_facts_sliding_windows():
    assert model_facts(config("Mistral-7B-v0.1")).sliding_window == 4096
    assert model_facts(config("gemma-2-2b-it")).sliding_window == 4096
    assert model_facts(config("Meta-Llama-3-8B-Instruct")).sliding_window is None


def test_unknown_scheme_names_missing_keys():
    with pytest.raises(ValueError) as info:
        model_facts({"model_type": "mystery", "width": 512})
    message = str(info.value)
    assert "mystery" in message
    assert "hidden_size (or n_embd, d_model)" in message
    assert "num_hidden_layers (or n_layer, n_layers, num_layers, decoder_layers)" in message


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
    assert weights_bytes_per_gpu(TINY, checkpoint_dir=tmp_path) == \
        weights_bytes_from_config(TINY)


def test_weights_follow_the_safetensors_index(tmp_path):
    _write_checkpoint(tmp_path, _tiny_tensors())
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "consolidated.safetensors").write_bytes(b"not read")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}))
    assert weights_bytes_from_safetensors(tmp_path, TINY) == \
        sum(t.nbytes for t in _tiny_tensors().values())
