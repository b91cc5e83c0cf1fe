"""The memory report: the plan's prediction beside the engine's measurement, same names.

The engine builds one at start-up; `brim serve` logs it, serves it (`GET /v1/memory`) and,
when the KV cache cannot hold max_model_len, writes it to the pod's termination message.
The operator reads it from either place into `status.measured`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """Where one GPU's memory goes, in bytes, as predicted or as measured.

    gpu_memory_bytes: the GPU's total memory.
    weights_bytes: the model's weights (and brim's RoPE table).
    activation_bytes: the peak of one forward at max_num_batched_tokens beyond the weights.
    non_torch_bytes: held outside torch's allocator (CUDA context, library images).
    non_kv_bytes: everything but the KV cache: weights + activations + non-torch (+ graphs).
    num_gpu_blocks: KV-cache blocks in what total x gpu_memory_utilization leaves.
    """

    gpu_memory_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    non_kv_bytes: int
    num_gpu_blocks: int

    @classmethod
    def from_json(cls, data: dict) -> "MemoryUse":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """How the engine sized its KV cache.

    device: "cuda" or "cpu".
    gpu_memory_utilization: the share of GPU memory the engine was allowed (as configured).
    weights_bytes: the loaded weights, measured on the model.
    num_gpu_blocks: the blocks the engine runs with (its measurement, capped by
        num_gpu_blocks when set; on CPU a share of RAM or num_gpu_blocks).
    max_model_len: the context the engine serves (lowered by "auto" to what the cache holds).
    requested_max_model_len: the context asked for before any lowering.
    predicted: the planner's figures for this GPU and these settings (CUDA only).
    measured: the profiled figures (CUDA only: CPU memory is not profiled).
    """

    device: str
    gpu_memory_utilization: float
    block_size: int
    kv_bytes_per_token: int
    weights_bytes: int
    num_gpu_blocks: int
    max_model_len: int
    requested_max_model_len: int
    predicted: MemoryUse | None = None
    measured: MemoryUse | None = None

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_tokens * self.kv_bytes_per_token

    @property
    def max_concurrency(self) -> float:
        """Requests of max_model_len tokens the cache holds at once."""
        return self.kv_cache_tokens / self.max_model_len

    @property
    def fits(self) -> bool:
        """The cache holds at least one request of the requested max_model_len."""
        return self.kv_cache_tokens >= self.requested_max_model_len

    @property
    def num_gpu_blocks_error_percent(self) -> float | None:
        """How far the prediction was off, in % of the measured blocks (positive: optimistic)."""
        if self.predicted is None or self.measured is None or not self.measured.num_gpu_blocks:
            return None
        return 100 * (self.predicted.num_gpu_blocks - self.measured.num_gpu_blocks) \
            / self.measured.num_gpu_blocks

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(kv_cache_tokens=self.kv_cache_tokens, kv_cache_bytes=self.kv_cache_bytes,
                   max_concurrency=self.max_concurrency, fits=self.fits,
                   num_gpu_blocks_error_percent=self.num_gpu_blocks_error_percent)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "MemoryReport":
        """Read a report back (from a termination message or the HTTP endpoint)."""
        if not isinstance(data, dict):
            raise ValueError("a memory report is a JSON object")
        values = {}
        for f in fields(cls):
            if f.name in ("predicted", "measured"):
                values[f.name] = MemoryUse.from_json(data[f.name]) if data.get(f.name) else None
            elif f.name in data:
                values[f.name] = data[f.name]
            else:
                raise ValueError(f"a memory report needs `{f.name}`")
        return cls(**values)
