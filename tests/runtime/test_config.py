"""Configuration rules: each rule and the message it gives."""

from __future__ import annotations

import json
import re

import pytest

from brim.runtime.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from brim.runtime.engine.errors import KVCacheTooSmallError, PromptTooLongError
from brim.runtime.sampling_params import SamplingParams


def checkpoint(tmp_path, config: dict, tokenizer_config: dict | None = None):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


# -- the model's config ----------------------------------------------------------------------


def test_model_config_derives_from_the_folder(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 8192}, {"model_max_length": 4096})
    config = ModelConfig.from_path(path)
    assert (config.max_model_len, config.derived_max_model_len) == (4096, 4096)
    assert ModelConfig.from_path(path, max_model_len="2k").max_model_len == 2000


def test_user_max_model_len_above_the_model_is_refused(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 4096})
    with pytest.raises(ValueError, match=re.escape(
        "max_model_len=8192 is longer than the model's maximum of 4096 tokens"
    )) as info:
        ModelConfig.from_path(path, max_model_len="8K")
    assert "Lower max_model_len to 4096 or less" in str(info.value)
    assert "allow_long_max_model_len=True" in str(info.value)
    config = ModelConfig.from_path(path, max_model_len=8192, allow_long_max_model_len=True)
    assert (config.max_model_len, config.derived_max_model_len) == (8192, 4096)


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ModelConfig.from_path(tmp_path)


# -- scheduler limits ------------------------------------------------------------------------


def test_max_num_batched_tokens_at_least_max_num_seqs():
    with pytest.raises(ValueError, match=re.escape(
        "max_num_batched_tokens (100) must be >= max_num_seqs (256)"
    )):
        SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=100, max_model_len=4096)
    SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=256, max_model_len=4096)


def test_max_num_batched_tokens_at_most_max_num_seqs_times_max_model_len():
    with pytest.raises(ValueError, match=re.escape(
        "max_num_batched_tokens (8193) must be <= max_num_seqs x max_model_len "
        "(2 x 4096 = 8192)"
    )) as info:
        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8193, max_model_len=4096)
    assert "Lower max_num_batched_tokens to 8192" in str(info.value)
    SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8192, max_model_len=4096)


def test_max_num_seqs_at_least_one():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8, max_model_len=8)


def test_engine_config_default_token_budget_fits_small_limits(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 64})
    config = EngineConfig.create(path, max_num_seqs=2)
    assert config.scheduler.max_num_batched_tokens == 128  # 2 x 64, under the CPU default
    config = EngineConfig.create(path, max_num_seqs=4, max_num_batched_tokens="0.25K")
    assert config.scheduler.max_num_batched_tokens == 256
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        EngineConfig.create(path, device="tpu")


def test_configs_are_replaced_not_patched(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 4096})
    config = EngineConfig.create(path, max_num_seqs=4, max_num_batched_tokens=2048)
    with pytest.raises(AttributeError):
        config.model.max_model_len = 64  # frozen
    shorter = config.with_max_model_len(256)
    assert (shorter.model.max_model_len, shorter.scheduler.max_model_len) == (256, 256)
    # SchedulerConfig's own rule: a step never holds more than every sequence's tokens.
    assert shorter.scheduler.max_num_batched_tokens == 4 * 256
    assert config.model.max_model_len == 4096 and config.scheduler.max_num_batched_tokens == 2048
    assert shorter.with_max_model_len(1024).scheduler.max_num_batched_tokens == 1024


def test_a_capped_cache_below_one_request_is_refused_before_loading(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 4096})
    with pytest.raises(KVCacheTooSmallError, match=re.escape(
            "The KV cache holds 64 tokens (4 blocks of 16), fewer than max_model_len=512")):
        EngineConfig.create(path, num_gpu_blocks=4, max_model_len=512)
    # With max_model_len "auto" the engine lowers the length instead.
    config = EngineConfig.create(path, num_gpu_blocks=4, max_model_len="auto")
    assert config.model.auto_max_model_len and config.model.max_model_len == 4096


def test_the_checkpoint_dtype_decides_auto(tmp_path):
    path = checkpoint(tmp_path, {"max_position_embeddings": 64, "torch_dtype": "bfloat16"})
    assert ModelConfig.from_path(path, device="cuda").dtype == "bfloat16"
    assert ModelConfig.from_path(path, device="cpu").dtype == "float32"
    assert ModelConfig.from_path(path, device="cpu", dtype="bf16").dtype == "bfloat16"


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 12}, "block_size must be a power of two >= 8, got 12"),
    ({"block_size": 4}, "block_size must be a power of two >= 8, got 4"),
    ({"num_gpu_blocks": 0}, "num_gpu_blocks must be >= 1, got 0"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in (0, 1], got 1.5"),
    ({"cpu_kv_cache_fraction": 0.95}, "cpu_kv_cache_fraction must be in (0, 0.9], got 0.95"),
])
def test_cache_config_rules(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CacheConfig(**kwargs)


# -- per request: prompt + max_tokens <= max_model_len ----------------------------------------


def test_prompt_plus_max_tokens_spells_out_the_budget():
    error = PromptTooLongError(4500, 27000, 31096)
    assert isinstance(error, ValueError)
    assert (
        "Given your max_tokens=27000 request and max_model_len=31096, only 4096 tokens are "
        "available for the prompt, and your prompt has 4500 tokens."
    ) in str(error)
    assert "Shorten the prompt by 404 tokens or lower max_tokens to 26596." in str(error)


def test_max_tokens_alone_over_max_model_len_asks_only_to_lower_max_tokens():
    for max_tokens in (4096, 5000):
        message = str(PromptTooLongError(10, max_tokens, 4096))
        assert message == (
            f"Your max_tokens={max_tokens} request alone fills max_model_len=4096 (prompt plus "
            "output), leaving no room for your prompt of 10 tokens. Lower max_tokens to 4086 or "
            "less."
        )


def test_prompt_alone_too_long_has_its_own_message():
    for error in (PromptTooLongError(4096, None, 4096), PromptTooLongError(5000, 10, 4096)):
        message = str(error)
        assert message.startswith("This model's maximum context length is 4096 tokens, and "
                                  f"your prompt has {error.prompt_len} tokens")
        assert "Shorten the prompt to at most 4095 tokens." in message
        assert "max_tokens" not in message


def test_kv_cache_too_small_says_how_many_tokens_it_holds():
    error = KVCacheTooSmallError(4, 16, 512, "raise num_gpu_blocks")
    assert str(error) == (
        "The KV cache holds 64 tokens (4 blocks of 16), fewer than max_model_len=512, so not "
        "even one full-length request fits. Lower max_model_len to 64 or less, or raise "
        "num_gpu_blocks."
    )
    assert (error.capacity, error.max_model_len) == (64, 512)


@pytest.mark.slow
def test_engine_refuses_a_kv_cache_smaller_than_max_model_len(bundled_model_dir):
    from brim.runtime import LLM

    with pytest.raises(KVCacheTooSmallError, match=re.escape("The KV cache holds 64 tokens")):
        LLM(model=str(bundled_model_dir), num_gpu_blocks=4, max_model_len=512, device="cpu")


@pytest.mark.slow
def test_auto_max_model_len_serves_what_the_cache_holds(bundled_model_dir):
    from brim.runtime import LLM

    llm = LLM(model=str(bundled_model_dir), num_gpu_blocks=4, max_model_len="auto",
              device="cpu", max_num_seqs=2)
    engine = llm.engine
    assert engine.max_model_len == 64 and engine.config.scheduler.max_model_len == 64
    # A step never holds more than max_num_seqs full-length requests.
    assert engine.config.scheduler.max_num_batched_tokens == 2 * 64
    out = llm.generate([[5] * 60], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(PromptTooLongError, match="max_model_len=64"):
        engine.add_request("long", [5] * 62, SamplingParams(max_tokens=4))


@pytest.mark.slow
def test_engine_refuses_prompts_over_the_budget(bundled_model_dir):
    from brim.runtime import LLM

    llm = LLM(model=str(bundled_model_dir), max_model_len=64, num_gpu_blocks=8, device="cpu")
    engine = llm.engine
    with pytest.raises(PromptTooLongError, match=re.escape(
        "Given your max_tokens=20 request and max_model_len=64, only 44 tokens are available "
        "for the prompt, and your prompt has 50 tokens."
    )):
        engine.add_request("a", [5] * 50, SamplingParams(max_tokens=20))
    with pytest.raises(PromptTooLongError, match="your prompt has 64 tokens"):
        engine.add_request("b", [5] * 64, SamplingParams(max_tokens=None))
    # Exactly at the limit is fine; max_tokens=None takes what is left.
    engine.add_request("c", [5] * 44, SamplingParams(max_tokens=20))
    engine.add_request("d", [5] * 60, SamplingParams(max_tokens=None))
    assert engine.parents["d"][0].max_tokens == 4
    assert not engine.parents.keys() - {"c", "d"}  # the refused ones left nothing behind


# -- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.2}, "top_p must be in (0, 1], got 1.2"),
    ({"top_k": -2}, "top_k must be 0 or -1 (disabled), or a positive integer, got -2"),
    ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
    ({"n": 0}, "n must be >= 1, got 0"),
    ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
    ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens (5) must be <= max_tokens (3)"),
    ({"logprobs": -1}, "logprobs must be >= 0, got -1"),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
])
def test_sampling_params_rules(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation():
    params = SamplingParams(stop="END", top_k=-1, temperature=1e-7, stop_token_ids=None)
    assert params.stop == ["END"] and params.top_k == 0 and params.stop_token_ids == []
    assert params.temperature == 0.0 and params.is_greedy
    assert SamplingParams(min_tokens=50, max_tokens=None).max_tokens is None
    clone = params.clone(seed=3)
    assert clone.seed == 3 and clone.stop == ["END"] and params.seed is None
