"""How the server behaves around the engine: settings with their defaults.

Dependency-free, so that `brim serve --help` works without the server's packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20


@dataclass(slots=True)
class ServerSettings:
    """How the server behaves around the engine (CLI flags map one-to-one).

    served_model_names: names clients may pass as `model`; the first labels the metrics.
    api_key: when set, every path but /health and /metrics needs `Authorization: Bearer`.
    max_queue_len: new requests get 503 while this many are waiting; None: no limit.
    max_request_body_bytes: larger bodies get 413.
    enable_vllm_metrics: also export the metrics under vLLM's names.
    """

    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_queue_len: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    enable_vllm_metrics: bool = False

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names needs at least one name")
        if self.max_queue_len is not None and self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1 (or unset), got {self.max_queue_len}")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be >= 1024, got "
                             f"{self.max_request_body_bytes}")
