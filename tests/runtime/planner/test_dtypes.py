"""Dtype names, aliases and the `auto` rules, defined once for engine and planner."""

from __future__ import annotations

import pytest

from brim.runtime.planner.dtypes import (KV_CACHE_DTYPE_BYTES, MODEL_DTYPE_BYTES, canonical,
                                         resolve_dtype, resolve_kv_cache_dtype)


@pytest.mark.parametrize("name, want", [
    ("bf16", "bfloat16"), ("torch.float16", "float16"), ("FP32", "float32"), ("half", "float16"),
    ("float", "float32"), (" BFloat16 ", "bfloat16"),
])
def test_aliases(name, want):
    assert canonical(name) == want


@pytest.mark.parametrize("dtype, declared, device, want", [
    ("auto", "bfloat16", "cuda", "bfloat16"),
    ("auto", "bfloat16", "cpu", "float32"),  # half precision is slow and inexact on CPU
    ("auto", None, "cuda", "float32"),  # nothing declared
    ("auto", "float8_e4m3fn", "cuda", "float32"),  # not a dtype the engine computes in
    ("auto", "torch.float16", "cuda", "float16"),
    ("fp16", "bfloat16", "cpu", "float16"),  # an explicit choice is kept
])
def test_auto_dtype(dtype, declared, device, want):
    assert resolve_dtype(dtype, declared, device) == want


def test_unknown_dtypes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, "
                                         "float16; got 'int4'"):
        resolve_dtype("int4", None, "cuda")
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of .*fp8.*got 'q4'"):
        resolve_kv_cache_dtype("q4", "bfloat16")


def test_kv_cache_dtypes():
    assert resolve_kv_cache_dtype("auto", "bfloat16") == "bfloat16"
    assert resolve_kv_cache_dtype("FP8", "bfloat16") == "fp8"
    assert {n: KV_CACHE_DTYPE_BYTES[n] for n in MODEL_DTYPE_BYTES} == MODEL_DTYPE_BYTES
    assert KV_CACHE_DTYPE_BYTES["fp8_e5m2"] == 1
