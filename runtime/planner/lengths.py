"""Token counts: reading them (`32k`), and the longest context a model supports.

Also the per-step token budgets' defaults, so that the engine and the planner agree on them.
"""

from __future__ import annotations

import logging
import math
import re

from brim.runtime.planner.facts import MAX_LEN_KEYS, LengthFacts, length_facts, \
    tokenizer_max_length

logger = logging.getLogger(__name__)

# Used when config.json names no length at all (vLLM's fallback too).
DEFAULT_MAX_MODEL_LEN = 2048
# Requests in one engine step.
DEFAULT_MAX_NUM_SEQS = 256
# Tokens in one engine step, per device. On CPU a long prefill chunk costs seconds and the torch
# attention materialises [heads, q, k] scores, so a smaller step budget keeps latency and
# memory sane.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*$")
_MULTIPLIER = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_token_count(value: int | str) -> int:
    """Parse a human-readable token count: `1k` = 1000, `1K` = 1024, `25.6k` = 25600.

    Lower-case suffixes (k, m, g) are decimal, upper-case (K, M, G) binary.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a token count, got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = _COUNT.match(str(value))
        if not match:
            raise ValueError(
                f"cannot read {value!r} as a token count; use an integer or a number with a "
                "suffix: k/m/g (x1000) or K/M/G (x1024), e.g. '25.6k' or '32K'"
            )
        number, suffix = match.groups()
        exact = float(number) * _MULTIPLIER[suffix]
        count = round(exact)
        if not math.isclose(exact, count, abs_tol=1e-6):
            raise ValueError(f"{value!r} is {exact} tokens, not a whole number of tokens")
    if count <= 0:
        raise ValueError(f"a token count must be positive, got {value!r}")
    return count


def is_auto(value) -> bool:
    """True for the string 'auto' (any case, surrounding spaces)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def derive_max_model_len(
    hf_config: dict,
    tokenizer_config: dict | None = None,
    *,
    disable_sliding_window: bool = False,
) -> int:
    """The longest context the model supports, from config.json and tokenizer_config.json."""
    return max_model_len_of(length_facts(hf_config), tokenizer_max_length(tokenizer_config),
                            disable_sliding_window=disable_sliding_window)


def max_model_len_of(facts: LengthFacts, tokenizer_max: int | None = None, *,
                     disable_sliding_window: bool = False) -> int:
    """The longest context the model supports, as vLLM derives it.

    In vLLM's order: the smallest length key present in config.json; a sliding window caps
    it when sliding window is disabled; 2048 with a warning when nothing says; RoPE scaling
    applied (linear, dynamic and yarn multiply by the factor, yarn from
    `original_max_position_embeddings`; llama3 and longrope keep `max_position_embeddings`,
    which already states the scaled length); the tokenizer's `model_max_length` caps it.
    """
    max_len = min((length for _, length in facts.context_lengths), default=None)

    window = facts.sliding_window
    if disable_sliding_window and window is not None:
        max_len = window if max_len is None else min(max_len, window)

    if max_len is None:
        max_len = DEFAULT_MAX_MODEL_LEN
        logger.warning("config.json names none of %s; assuming max_model_len=%d",
                       ", ".join(MAX_LEN_KEYS), DEFAULT_MAX_MODEL_LEN)

    scaling = facts.rope_scaling
    # Gemma 3's rope_scaling applies to its global layers only; vLLM leaves its length alone.
    if scaling and "gemma3" not in facts.model_type:
        rope_type = scaling["rope_type"]
        if rope_type in ("linear", "dynamic", "yarn"):
            factor = float(scaling.get("factor", 1.0))
            if rope_type == "yarn" and "original_max_position_embeddings" in scaling:
                max_len = int(scaling["original_max_position_embeddings"])
            max_len = int(max_len * factor)
        # llama3, longrope, su, mrope: max_position_embeddings is already the scaled length.

    if tokenizer_max is not None:
        max_len = min(max_len, tokenizer_max)
    return max_len


def default_max_num_batched_tokens(device: str, max_num_seqs: int, max_model_len: int) -> int:
    """The step budget when none is given: the device's default, lowered so that a small
    max_model_len or max_num_seqs stays valid (never more than every sequence's tokens,
    never fewer than one token per sequence)."""
    return max(max_num_seqs, min(DEFAULT_MAX_NUM_BATCHED_TOKENS[device],
                                 max_num_seqs * max_model_len))
