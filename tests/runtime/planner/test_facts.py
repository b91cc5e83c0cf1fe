"""Model facts across naming schemes, safetensors headers, and a checkpoint's facts as JSON."""

from __future__ import annotations

import json

import pytest

from brim.runtime.planner.facts import (CheckpointFacts, model_facts, read_checkpoint,
                                        read_safetensors_header, safetensors_files,
                                        tokenizer_max_length)
from tests.runtime.planner.conftest import config


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


def test_model_code_facts_of_a_llama():
    f = model_facts(config("Meta-Llama-3-8B-Instruct"))
    assert (f.rms_norm_eps, f.max_position_embeddings, f.rope_theta) == (1e-5, 8192, 500000.0)
    assert f.rope_scaling == {"rope_type": "default"}
    assert f.layer_sliding_windows == (None,) * 32
    assert (f.has_qkv_bias, f.has_o_bias, f.has_mlp_bias) == (False, False, False)
    assert f.architectures == ("LlamaForCausalLM",) and f.checkpoint_dtype == "bfloat16"
    assert f.eos_token_ids == (128009,)


def test_sliding_windows_per_layer():
    mistral = model_facts(config("Mistral-7B-v0.1"))
    assert mistral.layer_sliding_windows == (4096,) * 32
    qwen = config("Qwen2-7B-Instruct")  # use_sliding_window: false
    assert model_facts(qwen).layer_sliding_windows == (None,) * 28
    # Qwen2 slides only in layers >= max_window_layers, and only when asked to.
    sliding = {**qwen, "use_sliding_window": True, "max_window_layers": 26}
    assert model_facts(sliding).layer_sliding_windows == (None,) * 26 + (131072,) * 2
    typed = {**config("Mistral-7B-v0.1"), "num_hidden_layers": 2,
             "layer_types": ["full_attention", "sliding_attention"]}
    assert model_facts(typed).layer_sliding_windows == (None, 4096)


@pytest.mark.parametrize("rope, theta, scaling", [
    ({"rope_theta": 1e4}, 1e4, {"rope_type": "default"}),  # transformers 4.x, unscaled
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, 5e5,
     {"type": "linear", "factor": 2.0, "rope_type": "linear"}),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, 1e6,
     {"rope_theta": 1e6, "rope_type": "default"}),  # transformers 5.x
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear",
                                             "factor": 8.0},
                          "sliding_attention": {"rope_theta": 1e4}}}, 1e6,
     {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0}),  # per layer type
])
def test_rope_in_every_spelling(rope, theta, scaling):
    base = {k: v for k, v in config("SmolLM2-135M-Instruct").items()
            if not k.startswith("rope_")}
    f = model_facts({**base, **rope})
    assert (f.rope_theta, f.rope_scaling) == (theta, scaling)


def test_eos_ids_from_config_and_generation_config():
    ckpt = CheckpointFacts(config={**config("SmolLM2-135M-Instruct"), "eos_token_id": [2, 7]},
                           generation_config={"eos_token_id": 9})
    assert ckpt.eos_token_ids == {2, 7, 9}
    assert CheckpointFacts(config=config("gpt2")).eos_token_ids == {50256}


def test_tokenizer_limit_ignores_sentinels():
    assert tokenizer_max_length({"model_max_length": 2048}) == 2048
    assert tokenizer_max_length({"model_max_length": int(1e30)}) is None
    assert tokenizer_max_length({"model_max_length": True}) is None
    assert tokenizer_max_length(None) is None


def _checkpoint_folder(folder, tensors: dict, cfg: dict):
    from safetensors.numpy import save_file

    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_safetensors_files_skip_consolidated_beside_shards(tmp_path):
    for name in ("model-00002-of-00002.safetensors", "consolidated.safetensors",
                 "model-00001-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in safetensors_files(tmp_path)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "consolidated.safetensors").write_bytes(b"")
    assert [p.name for p in safetensors_files(alone)] == ["consolidated.safetensors"]


def test_checkpoint_facts_survive_json_and_fit_a_termination_message(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = {**config("SmolLM2-135M-Instruct"), "num_hidden_layers": 1, "vocab_size": 128}
    folder = _checkpoint_folder(tmp_path, {
        "model.embed_tokens.weight": np.zeros((128, 576), np.float32),
        "model.layers.0.self_attn.k_proj.weight": np.zeros((192, 576), np.float32),
        "model.norm.weight": np.zeros((576,), np.float32)}, cfg)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    local = read_checkpoint(folder)
    text = json.dumps(local.to_json(), separators=(",", ":"))
    remote = CheckpointFacts.from_json(json.loads(text))
    assert remote.config == cfg and remote.tokenizer_max_length == 4096
    for dtype_bytes in (2, 4):
        for tp in (1, 2, 4, 8):
            assert remote.checkpoint_weights_bytes(dtype_bytes, tp) == \
                local.checkpoint_weights_bytes(dtype_bytes, tp)
    # K is split over at most the 3 KV heads: 192 x 576 / 3 rows each at TP 4 and 8.
    assert local.checkpoint_weights_bytes(2, 4) == 2 * (32 * 576 + 192 * 576 // 3 + 576)
    # Llama-3-8B's real config.json plus its weights table: well under the 4 KiB a
    # Kubernetes termination message holds.
    llama = CheckpointFacts(config=config("Meta-Llama-3-8B-Instruct"),
                            weights_bytes=local.to_json()["weights_bytes"])
    assert len(json.dumps(llama.to_json(), separators=(",", ":"))) < 4096


def test_bad_facts_json_is_refused():
    with pytest.raises(ValueError, match="`config` object"):
        CheckpointFacts.from_json({"tokenizer_config": {}})


def test_a_header_past_the_format_limit_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((200 * 2**20).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="exceeds safetensors' 104857600-byte limit"):
        read_safetensors_header(path)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        read_safetensors_header(tmp_path / "short.safetensors")
