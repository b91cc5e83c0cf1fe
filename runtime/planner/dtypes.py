"""Every dtype brim names, its aliases and its size in bytes: defined here once.

Model dtypes are what the engine computes and stores weights in; KV-cache dtypes add the
one-byte FP8 formats; safetensors dtypes are what checkpoint headers declare.
"""

from __future__ import annotations

# The engine's model dtypes (torch's names) and bytes per element.
MODEL_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The KV cache may also be stored in FP8 (one byte per element).
KV_CACHE_DTYPE_BYTES = {**MODEL_DTYPE_BYTES, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# Other spellings users and configs write, and the names they mean.
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16"}

# safetensors header dtypes and bytes per element.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Floating tensors are converted to the serving dtype on load; others are kept as stored.
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def canonical(name: str) -> str:
    """Lower-case, `torch.` prefix dropped, aliases resolved: 'torch.BF16' -> 'bfloat16'."""
    name = str(name).strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(name, name)


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, device: str) -> str:
    """The dtype the engine serves in.

    `auto` takes the checkpoint's own dtype (config.json's `torch_dtype`), except on CPU, and
    for checkpoints that declare none or an unknown one: float32 there.
    """
    name = canonical(dtype)
    if name == "auto":
        declared = canonical(checkpoint_dtype or "float32")
        if device == "cpu" or declared not in MODEL_DTYPE_BYTES:
            return "float32"
        return declared
    if name not in MODEL_DTYPE_BYTES:
        raise ValueError(f"dtype must be one of auto, {', '.join(MODEL_DTYPE_BYTES)}; "
                         f"got {dtype!r}")
    return name


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """`auto` stores the KV cache in the model's (resolved) dtype; fp8 variants take a byte."""
    name = canonical(kv_cache_dtype)
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPE_BYTES:
        raise ValueError(f"kv_cache_dtype must be auto or one of "
                         f"{', '.join(KV_CACHE_DTYPE_BYTES)}; got {kv_cache_dtype!r}")
    return name
