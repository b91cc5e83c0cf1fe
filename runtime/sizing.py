"""The memory model: what fits, and why.

Torch-free on purpose: the operator image imports this module without torch.
"""

from __future__ import annotations

import logging
import math
import re

logger = logging.getLogger(__name__)

# Keys that bound a model's context, in the naming schemes of the families we read.
MAX_LEN_KEYS = (
    "max_position_embeddings",  # Llama, Mistral, Qwen2, Gemma, Phi-3, Falcon
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM
    "model_max_length",
    "max_target_positions",  # Whisper's decoder
)
DEFAULT_MAX_MODEL_LEN = 2048

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


def _rope_scaling(hf_config: dict) -> dict | None:
    # transformers < 5 writes `rope_scaling`; 5.x writes `rope_parameters` (always present,
    # with rope_type "default" when unscaled).
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return None if rope_type == "default" else {**scaling, "rope_type": rope_type}


def derive_max_model_len(
    hf_config: dict,
    tokenizer_config: dict | None = None,
    *,
    disable_sliding_window: bool = False,
) -> int:
    """The longest context the model supports, as vLLM derives it.

    The smallest length key present in config.json; RoPE scaling applied (linear,
    dynamic and yarn multiply by the factor; llama3 and longrope keep
    `max_position_embeddings`, which already states the scaled length); a sliding
    window caps it when sliding window is disabled; the tokenizer's
    `model_max_length` caps it; 2048 with a warning when nothing says.
    """
    present = [(key, hf_config[key]) for key in MAX_LEN_KEYS if hf_config.get(key)]
    if present:
        key, max_len = min(present, key=lambda kv: kv[1])
        max_len = int(max_len)
    else:
        key, max_len = None, DEFAULT_MAX_MODEL_LEN
        logger.warning(
            "config.json names none of %s; assuming max_model_len=%d",
            ", ".join(MAX_LEN_KEYS),
            DEFAULT_MAX_MODEL_LEN,
        )

    scaling = _rope_scaling(hf_config)
    if scaling and key is not None:
        rope_type = scaling["rope_type"]
        if rope_type in ("linear", "dynamic", "yarn"):
            factor = float(scaling.get("factor", 1.0))
            if rope_type == "yarn" and "original_max_position_embeddings" in scaling:
                max_len = int(scaling["original_max_position_embeddings"])
            max_len = int(max_len * factor)
        # llama3, longrope, su, mrope: max_position_embeddings is already the scaled length.

    window = sliding_window_of(hf_config)
    if disable_sliding_window and window is not None:
        max_len = min(max_len, window)

    if tokenizer_config:
        tokenizer_max = tokenizer_config.get("model_max_length")
        # tokenizers without a limit store a huge sentinel (int(1e30)).
        if isinstance(tokenizer_max, (int, float)) and 0 < tokenizer_max < 10**12:
            max_len = min(max_len, int(tokenizer_max))
    return max_len


def sliding_window_of(hf_config: dict) -> int | None:
    """The sliding window of a config, or None when the model attends globally."""
    window = hf_config.get("sliding_window")
    if not window or hf_config.get("use_sliding_window") is False:
        return None
    if isinstance(window, list):  # some configs give one per layer
        window = min((w for w in window if w), default=None)
    return int(window) if window else None
