"""Token counts and the longest context a model supports (vLLM's derivation)."""

from __future__ import annotations

import logging
import re

import pytest

from brim.runtime.planner.facts import MAX_LEN_KEYS, sliding_window_of
from brim.runtime.planner.lengths import (default_max_num_batched_tokens, derive_max_model_len,
                                          is_auto, parse_token_count)
from tests.runtime.planner.conftest import config


# -- human-readable lengths ------------------------------------------------------------------


@pytest.mark.parametrize("text, count", [
    ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("32K", 32768), ("2m", 2_000_000),
    ("1M", 2**20), ("1g", 10**9), ("1G", 2**30), ("4096", 4096), (" 8k ", 8000),
    (4096, 4096), ("0.5K", 512),
])
def test_token_counts(text, count):
    assert parse_token_count(text) == count


@pytest.mark.parametrize("text, message", [
    ("abc", "cannot read 'abc' as a token count"),
    ("1x", "cannot read '1x' as a token count"),
    ("-5", "cannot read '-5' as a token count"),
    ("1kk", "cannot read '1kk' as a token count"),
    ("", "cannot read '' as a token count"),
    ("1.5", "'1.5' is 1.5 tokens, not a whole number of tokens"),
    ("0.1K", "'0.1K' is 102.4 tokens"),
    ("0", "a token count must be positive, got '0'"),
    (-3, "a token count must be positive, got -3"),
    (True, "expected a token count, got True"),
])
def test_bad_token_counts_are_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_token_count(text)


# -- max_model_len derived from config.json --------------------------------------------------


@pytest.mark.parametrize("key", MAX_LEN_KEYS)
def test_each_length_key_is_read(key):
    assert derive_max_model_len({key: 3000}) == 3000


def test_smallest_length_key_present_wins():
    config = {"max_position_embeddings": 8192, "n_positions": 4096, "max_seq_len": 6000,
              "seq_length": 5000, "model_max_length": 7000, "max_target_positions": 4500}
    assert derive_max_model_len(config) == 4096
    del config["n_positions"]
    assert derive_max_model_len(config) == 4500


def test_sliding_window_caps_only_when_disabled_and_smaller():
    config = {"max_position_embeddings": 32768, "sliding_window": 4096}
    assert derive_max_model_len(config) == 32768
    assert derive_max_model_len(config, disable_sliding_window=True) == 4096
    wide = {"max_position_embeddings": 2048, "sliding_window": 4096}
    assert derive_max_model_len(wide, disable_sliding_window=True) == 2048


def test_tokenizer_model_max_length_caps_it():
    config = {"max_position_embeddings": 8192}
    assert derive_max_model_len(config, {"model_max_length": 2048}) == 2048
    assert derive_max_model_len(config, {"model_max_length": 16384}) == 8192
    # Tokenizers without a limit store a huge sentinel.
    assert derive_max_model_len(config, {"model_max_length": int(1e30)}) == 8192
    assert derive_max_model_len(config, {"model_max_length": 1000000000000000019884624838656}) \
        == 8192


def test_no_length_key_gives_2048_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="brim.runtime.planner.lengths"):
        assert derive_max_model_len({"hidden_size": 64}) == 2048
    assert "assuming max_model_len=2048" in caplog.text
    assert "max_position_embeddings" in caplog.text


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


@pytest.mark.parametrize("name, max_len", [
    ("Meta-Llama-3-8B-Instruct", 8192), ("Mistral-7B-v0.1", 32768), ("gpt2", 1024),
    ("mpt-7b", 2048), ("chatglm3-6b", 8192), ("SmolLM2-135M-Instruct", 8192),
    ("Qwen2-7B-Instruct", 32768), ("falcon-7b", 2048), ("gemma-2-2b-it", 8192),
    ("Phi-3-mini-4k-instruct", 4096), ("whisper-tiny", 448),
])
def test_published_configs(name, max_len):
    assert derive_max_model_len(config(name)) == max_len


def test_auto_is_the_word_auto():
    assert is_auto("auto") and is_auto(" AUTO ") and not is_auto("8k") and not is_auto(None)


def test_default_step_budget_stays_valid_for_small_limits():
    assert default_max_num_batched_tokens("cuda", 256, 8192) == 8192
    assert default_max_num_batched_tokens("cpu", 256, 8192) == 2048
    assert default_max_num_batched_tokens("cpu", 2, 64) == 128  # 2 x 64, under the default
    assert default_max_num_batched_tokens("cpu", 4096, 16) == 4096  # a token per sequence
