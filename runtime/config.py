"""Engine configuration: one validated dataclass per concern, checked on creation.

Torch-free: the operator and `brim plan` import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from brim.runtime.sizing import derive_max_model_len, parse_token_count

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}

# Per-step defaults. On CPU a long prefill chunk costs seconds and the torch attention
# materialises [heads, q, k] scores, so a smaller step budget keeps latency and memory sane.
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def normalize_dtype(dtype: str, hf_config: dict, device: str) -> str:
    """`auto` takes the checkpoint's dtype, except float32 on CPU for half-precision models."""
    dtype = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if dtype == "auto":
        declared = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
        declared = declared.removeprefix("torch.")
        if device == "cpu" or declared not in DTYPES:
            return "float32"
        return declared
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


@dataclass(slots=True)
class ModelConfig:
    """What the engine knows about the checkpoint.

    path: folder with config.json, safetensors and tokenizer files.
    hf_config: config.json as a dict.
    derived_max_model_len: the model's own limit (see sizing.derive_max_model_len).
    max_model_len: the limit this engine enforces (prompt + generated tokens).
    auto_max_model_len: max_model_len was "auto": the engine lowers it to what its KV cache
        holds instead of refusing to start.
    """

    path: Path
    hf_config: dict
    dtype: str
    max_model_len: int
    derived_max_model_len: int
    tokenizer_config: dict | None = None
    auto_max_model_len: bool = False

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | str | None = None,
        allow_long_max_model_len: bool = False,
    ) -> "ModelConfig":
        path = Path(path)
        hf_config = read_json(path / "config.json")
        if hf_config is None:
            raise FileNotFoundError(
                f"{path} has no config.json; pass a folder holding a Hugging Face checkpoint "
                "(config.json, *.safetensors, tokenizer files)"
            )
        tokenizer_config = read_json(path / "tokenizer_config.json")
        derived = derive_max_model_len(hf_config, tokenizer_config)
        is_auto = isinstance(max_model_len, str) and max_model_len.strip().lower() == "auto"
        if max_model_len is None or is_auto:
            resolved = derived
        else:
            resolved = parse_token_count(max_model_len)
            if resolved > derived and not allow_long_max_model_len:
                raise ValueError(
                    f"max_model_len={resolved} is longer than the model's maximum of {derived} "
                    f"tokens (derived from {path / 'config.json'}). Lower max_model_len to "
                    f"{derived} or less, or pass allow_long_max_model_len=True if you know the "
                    "model handles longer contexts (outputs may be wrong past its training length)."
                )
        return cls(
            path=path,
            hf_config=hf_config,
            dtype=normalize_dtype(dtype, hf_config, device),
            max_model_len=resolved,
            derived_max_model_len=derived,
            tokenizer_config=tokenizer_config,
            auto_max_model_len=is_auto,
        )


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache.

    block_size: tokens per block (a power of two >= 8: the kernels' tile size).
    num_gpu_blocks: cap on the number of blocks; None lets the engine size it (CUDA:
        measured free memory x gpu_memory_utilization; CPU: cpu_kv_cache_fraction of
        available RAM).
    """

    block_size: int = 16
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_fraction: float = 0.10
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 8 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 8, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not 0 < self.cpu_kv_cache_fraction <= 0.9:
            raise ValueError(
                f"cpu_kv_cache_fraction must be in (0, 0.9], got {self.cpu_kv_cache_fraction}"
            )


@dataclass(slots=True)
class SchedulerConfig:
    """Per-step limits of continuous batching.

    max_num_seqs: requests in one step.
    max_num_batched_tokens: tokens (prefill chunks + decodes) in one step.
    max_model_len: per request, prompt + generated tokens.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running request needs at least one "
                "token per step. Raise max_num_batched_tokens or lower max_num_seqs."
            )
        limit = self.max_num_seqs * self.max_model_len
        if self.max_num_batched_tokens > limit:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be <= max_num_seqs "
                f"x max_model_len ({self.max_num_seqs} x {self.max_model_len} = {limit}): a step "
                f"can never hold more tokens than that. Lower max_num_batched_tokens to {limit}."
            )


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str = "cpu"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        max_model_len: int | str | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | str | None = None,
        block_size: int = 16,
        num_gpu_blocks: int | None = None,
        gpu_memory_utilization: float = 0.90,
        enable_prefix_caching: bool = True,
        allow_long_max_model_len: bool = False,
        seed: int = 0,
        device: str = "cpu",
    ) -> "EngineConfig":
        if device not in DEFAULT_MAX_NUM_BATCHED_TOKENS:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        model_config = ModelConfig.from_path(
            model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            allow_long_max_model_len=allow_long_max_model_len,
        )
        max_len = model_config.max_model_len
        if max_num_seqs is None:
            max_num_seqs = DEFAULT_MAX_NUM_SEQS
        if max_num_batched_tokens is None:
            # The default adapts so that small max_model_len or max_num_seqs stay valid.
            default = DEFAULT_MAX_NUM_BATCHED_TOKENS[device]
            max_num_batched_tokens = max(max_num_seqs, min(default, max_num_seqs * max_len))
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=parse_token_count(max_num_batched_tokens),
            max_model_len=max_len,
        )
        cache_config = CacheConfig(
            block_size=block_size,
            num_gpu_blocks=num_gpu_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
        )
        return cls(model_config, cache_config, scheduler_config, device=device, seed=seed)
