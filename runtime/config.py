"""Engine configuration: one validated, frozen dataclass per concern, checked on creation.

Torch-free. Facts and defaults come from the planner (`brim.runtime.planner`), so the engine
and the planner cannot disagree about them; a config that must change (max_model_len lowered
by "auto") is replaced by a new, validated one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from brim.runtime.engine.errors import KVCacheTooSmallError
from brim.runtime.engine.speculative import SpeculativeConfig
from brim.runtime.planner.dtypes import (KV_CACHE_DTYPE_BYTES, canonical, resolve_dtype,
                                         resolve_kv_cache_dtype)
from brim.runtime.planner.facts import CheckpointFacts, ModelFacts, declared_dtype, read_checkpoint
from brim.runtime.planner.lengths import (DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS,
                                          default_max_num_batched_tokens, derive_max_model_len,
                                          is_auto, parse_token_count)
from brim.runtime.planner.memory import DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION
from brim.runtime.planner.quantization import QuantizationSpec, resolve_quantization

DEVICES = tuple(DEFAULT_MAX_NUM_BATCHED_TOKENS)  # "cpu", "cuda"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the engine knows about the checkpoint.

    path: folder with config.json, safetensors and tokenizer files.
    checkpoint: its facts (config.json, tokenizer_config.json, safetensors headers).
    dtype: the dtype the engine computes and stores weights in (resolved, never "auto").
    derived_max_model_len: the model's own limit (planner.lengths.derive_max_model_len).
    max_model_len: the limit this engine enforces (prompt + generated tokens).
    auto_max_model_len: max_model_len was "auto": the engine lowers it to what its KV cache
        holds instead of refusing to start.
    quantization: the scheme of the linear layers' weights (the checkpoint's, or FP8
        quantized while loading); None for plain weights.
    """

    path: Path
    checkpoint: CheckpointFacts
    dtype: str
    max_model_len: int
    derived_max_model_len: int
    auto_max_model_len: bool = False
    quantization: QuantizationSpec | None = None

    @property
    def facts(self) -> ModelFacts:
        """The model's shape (raises ValueError naming the keys config.json lacks)."""
        return self.checkpoint.model

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | str | None = None,
        allow_long_max_model_len: bool = False,
        quantization: str | None = None,
    ) -> "ModelConfig":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; pass a folder holding a Hugging Face checkpoint "
                "(config.json, *.safetensors, tokenizer files)"
            )
        checkpoint = read_checkpoint(path)
        # An unsupported scheme is refused here, before any weight is read.
        scheme = resolve_quantization(quantization, checkpoint.config)
        derived = derive_max_model_len(checkpoint.config, checkpoint.tokenizer_config)
        auto = is_auto(max_model_len)
        if max_model_len is None or auto:
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
            checkpoint=checkpoint,
            dtype=resolve_dtype(dtype, declared_dtype(checkpoint.config), device),
            max_model_len=resolved,
            derived_max_model_len=derived,
            auto_max_model_len=auto,
            quantization=scheme,
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache.

    block_size: tokens per block (a power of two >= 8: the kernels' tile size).
    num_gpu_blocks: cap on the number of blocks; None lets the engine size it (CUDA:
        measured free memory x gpu_memory_utilization; CPU: cpu_kv_cache_fraction of
        available RAM).
    kv_cache_dtype: what K and V are stored in: "auto" (the model dtype), a model dtype, or
        "fp8" (float8 e4m3 with per-layer scales: half of 16 bits' bytes per token).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    num_gpu_blocks: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    cpu_kv_cache_fraction: float = 0.10
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        name = canonical(self.kv_cache_dtype)
        if name == "fp8_e5m2":
            raise ValueError("kv_cache_dtype fp8_e5m2 is not supported: brim stores an FP8 KV "
                             "cache as e4m3 (with per-layer scales); use fp8 or fp8_e4m3")
        if name != "auto" and name not in KV_CACHE_DTYPE_BYTES:
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or one of float32, bfloat16, "
                             f"float16; got {self.kv_cache_dtype!r}")
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


@dataclass(frozen=True, slots=True)
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

    def with_max_model_len(self, max_model_len: int) -> "SchedulerConfig":
        """The same limits for a shorter max_model_len; the step budget shrinks with it where
        it must (a step never holds more than every sequence's tokens)."""
        return replace(self, max_model_len=max_model_len,
                       max_num_batched_tokens=min(self.max_num_batched_tokens,
                                                  self.max_num_seqs * max_model_len))


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How one copy of the model is split over devices.

    tensor_parallel_size: ranks (processes, one device each) that each hold a slice of every
        layer (runtime/models/parallel.py); 1 runs in the calling process with no workers.
    pipeline_parallel_size: only 1 (pipeline parallelism is not implemented).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size != 1:
            raise ValueError(
                f"pipeline_parallel_size={self.pipeline_parallel_size} is not supported: brim "
                "splits a model over devices with tensor parallelism only. Use "
                "pipeline_parallel_size=1 and tensor_parallel_size=N instead.")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The whole engine's configuration.

    enforce_eager: run the model op by op. Otherwise, on CPU, the work between attention
        calls is compiled by inductor (models/compiled.py; `compiles_model` says when).
    """

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str = "cpu"
    seed: int = 0
    speculative: SpeculativeConfig | None = None  # engine/speculative.py; None: off
    parallel: ParallelConfig = ParallelConfig()
    # The draft model of speculative method "draft_model" (engine/draft.py), else None.
    draft_model: ModelConfig | None = None
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.scheduler.max_model_len != self.model.max_model_len:
            raise ValueError(f"the scheduler's max_model_len ({self.scheduler.max_model_len}) "
                             f"must be the model's ({self.model.max_model_len})")
        if self.parallel.tensor_parallel_size > 1:
            self.model.facts.check_tensor_parallel_size(self.parallel.tensor_parallel_size)
            if self.model.quantization is not None:
                raise ValueError(
                    f"quantized weights ({self.model.quantization.describe()}) are served with "
                    f"tensor_parallel_size=1 only, got {self.parallel.tensor_parallel_size}: "
                    "the tensor-parallel loader slices float weights. Use "
                    "tensor_parallel_size=1, or a float checkpoint without --quantization")
        self._check_draft_model()
        # A cache capped below one full-length request can be refused before any weight loads.
        cap = self.cache.num_gpu_blocks
        if (cap is not None and not self.model.auto_max_model_len
                and cap * self.cache.block_size < self.model.max_model_len):
            raise KVCacheTooSmallError(cap, self.cache.block_size, self.model.max_model_len,
                                       "raise num_gpu_blocks")

    def _check_draft_model(self) -> None:
        spec, draft = self.speculative, self.draft_model
        wants_draft = spec is not None and spec.method == "draft_model"
        if wants_draft != (draft is not None):
            raise ValueError("a draft model config goes with speculative method draft_model "
                             "(EngineConfig.create loads it from speculative_config's model)")
        if draft is None:
            return
        if self.parallel.tensor_parallel_size > 1:
            raise ValueError(
                f"draft-model speculation runs with tensor_parallel_size=1 only, got "
                f"{self.parallel.tensor_parallel_size}; use n-gram speculation "
                '({"method": "ngram", ...}) with tensor parallelism')
        target_vocab, draft_vocab = self.model.facts.vocab_size, draft.facts.vocab_size
        if draft_vocab != target_vocab:
            raise ValueError(
                f"the draft model {draft.path} has a vocabulary of {draft_vocab} tokens, the "
                f"target {self.model.path} {target_vocab}: a draft must share the target's "
                "tokenizer and vocabulary (e.g. a smaller model of the same family)")
        positions = draft.facts.max_position_embeddings
        if positions < self.model.max_model_len:
            raise ValueError(
                f"the draft model {draft.path} handles positions up to {positions}, below "
                f"max_model_len={self.model.max_model_len}; lower max_model_len to {positions} "
                "or pick a draft with a longer context")

    @property
    def compiles_model(self) -> bool:
        """Whether the model runs compiled: CPU, unless enforce_eager, with one rank (the
        tensor-parallel all-reduces sit inside the regions compiled) and plain or FP8-cache
        but not quantized weights (their matmuls are not an op inductor can call)."""
        return (self.device == "cpu" and not self.enforce_eager
                and self.parallel.tensor_parallel_size == 1 and self.model.quantization is None)

    @property
    def kv_cache_dtype(self) -> str:
        """The KV cache's dtype, resolved: the model dtype for "auto"; "fp8" for e4m3."""
        name = resolve_kv_cache_dtype(self.cache.kv_cache_dtype, self.model.dtype)
        return "fp8" if name.startswith("fp8") else name

    def with_max_model_len(self, max_model_len: int) -> "EngineConfig":
        """This config serving a shorter context (what "auto" does when the cache is small)."""
        return replace(self, model=replace(self.model, max_model_len=max_model_len),
                       scheduler=self.scheduler.with_max_model_len(max_model_len))

    @classmethod
    def create(
        cls,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        max_model_len: int | str | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_gpu_blocks: int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        enable_prefix_caching: bool = True,
        allow_long_max_model_len: bool = False,
        seed: int = 0,
        device: str = "cpu",
        speculative_config: dict | str | SpeculativeConfig | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        quantization: str | None = None,
        enforce_eager: bool = False,
    ) -> "EngineConfig":
        if device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        parallel_config = ParallelConfig(tensor_parallel_size, pipeline_parallel_size)
        model_config = ModelConfig.from_path(
            model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            allow_long_max_model_len=allow_long_max_model_len,
            quantization=quantization,
        )
        spec = SpeculativeConfig.parse(speculative_config)
        draft_config = None
        if spec is not None and spec.method == "draft_model":
            spec, draft_config = _draft_model_config(spec, model_config, device)
            positions = draft_config.facts.max_position_embeddings
            if (model_config.max_model_len > positions
                    and (max_model_len is None or is_auto(max_model_len))):
                # Not asked for a length: serve what both models handle (refused otherwise).
                model_config = replace(model_config, max_model_len=positions)
        max_len = model_config.max_model_len
        if max_num_seqs is None:
            max_num_seqs = DEFAULT_MAX_NUM_SEQS
        if max_num_batched_tokens is None:
            max_num_batched_tokens = default_max_num_batched_tokens(device, max_num_seqs, max_len)
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
            kv_cache_dtype=kv_cache_dtype,
        )
        return cls(model_config, cache_config, scheduler_config, device=device, seed=seed,
                   speculative=spec, parallel=parallel_config, draft_model=draft_config,
                   enforce_eager=enforce_eager)


def _draft_model_config(spec: SpeculativeConfig, target: ModelConfig,
                        device: str) -> tuple[SpeculativeConfig, ModelConfig]:
    """The draft's folder (a Hub id is downloaded like the target's) and its facts, in the
    target's dtype."""
    from brim.runtime.models.hub import resolve_model

    try:
        path = resolve_model(spec.model)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"speculative_config model: {exc}") from None
    draft = ModelConfig.from_path(path, dtype=target.dtype, device=device,
                                  allow_long_max_model_len=True)
    return replace(spec, model=str(path)), draft
