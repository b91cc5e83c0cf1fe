"""How the server behaves around the engine: settings with their defaults.

Dependency-free, so that `brim serve --help` works without the server's packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20
# Seconds a request-supplied chat template may render (and a prompt take to tokenize).
DEFAULT_CHAT_TEMPLATE_TIMEOUT = 5.0
# Seconds in-flight requests get to finish on SIGTERM: below Kubernetes' default
# terminationGracePeriodSeconds (30), leaving time to end the rest and exit.
DEFAULT_SHUTDOWN_TIMEOUT = 25.0


@dataclass(slots=True)
class ServerSettings:
    """How the server behaves around the engine (CLI flags map one-to-one).

    served_model_names: names clients may pass as `model`; the first labels the metrics.
    api_key: when set, every path but /health and /metrics needs `Authorization: Bearer`.
    max_queue_len: new requests get 503 while this many are waiting; None: no limit.
    max_request_body_bytes: larger bodies get 413 (counted as they arrive, chunked or not).
    enable_vllm_metrics: also export the metrics under vLLM's names.
    trust_request_chat_template: accept a chat template in the request (vLLM's flag);
        otherwise such requests get 400.
    chat_template_timeout: seconds a request's chat template may render (in a separate
        process, killed past it) and a prompt may take to tokenize; past it, 400.
    shutdown_timeout: on SIGTERM, seconds the requests in flight get to finish before the
        rest are ended (a final error event on streams, 503 otherwise).
    """

    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_queue_len: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    enable_vllm_metrics: bool = False
    trust_request_chat_template: bool = False
    chat_template_timeout: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names needs at least one name")
        if self.max_queue_len is not None and self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be >= 1 (or unset), got {self.max_queue_len}")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be >= 1024, got "
                             f"{self.max_request_body_bytes}")
        if not self.chat_template_timeout > 0:
            raise ValueError(f"chat_template_timeout must be > 0 seconds, got "
                             f"{self.chat_template_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got "
                             f"{self.shutdown_timeout}")
