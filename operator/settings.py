"""What the operator applies to every runtime it launches: `brim operator`'s flags, which the
Helm chart sets from its values."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field


def _version() -> str:
    try:
        return importlib.metadata.version("brim")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


IMAGE_REPOSITORY = "ghcr.io/brim-dev"
DEFAULT_RUNTIME_IMAGE = f"{IMAGE_REPOSITORY}/brim-runtime:{_version()}"
DEFAULT_OPERATOR_IMAGE = f"{IMAGE_REPOSITORY}/brim-operator:{_version()}"


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Defaults and knobs of the operator.

    runtime_image: the runtime's image when spec.image is not set.
    facts_image: runs `brim facts` in the inspect Jobs of pvc:// models (no torch needed:
        the operator's own image).
    gpu_memory_utilization: spec.engine.gpuMemoryUtilization's default (a number or "auto").
    gpu_resources / cpu_resources: the runtime container's resources when spec.resources is
        not set, for GPU and CPU deployments.
    tolerations: added to every runtime pod (besides nvidia.com/gpu's own).
    resync_seconds: how often each ModelDeployment is reconciled even without events
        (restores edited children, re-plans a spec that did not fit when GPUs appear).
    termination_grace_seconds: the runtime's drain time on shutdown.
    hf_endpoint: passed to the runtime pods as HF_ENDPOINT (a mirror), when set.
    load_bytes_per_second: how fast a replica is assumed to read its weights, to size the
        start-up probe's allowance (downloads from the hub: hub_bytes_per_second).
    max_tensor_parallel_size: the most GPUs per replica plans may use (the runtime splits a
        model over them with tensor parallelism). 8, the most GPUs one node usually has and
        the largest size "auto" considers; lower it to keep replicas on fewer GPUs.
    """

    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    facts_image: str = DEFAULT_OPERATOR_IMAGE
    image_pull_policy: str = "IfNotPresent"
    gpu_memory_utilization: float | str = 0.9
    gpu_resources: dict = field(default_factory=lambda: {
        "requests": {"cpu": "2", "memory": "16Gi"}})
    cpu_resources: dict = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    resync_seconds: float = 30.0
    termination_grace_seconds: int = 30
    hf_endpoint: str | None = None
    load_bytes_per_second: float = 200e6
    hub_bytes_per_second: float = 50e6
    runtime_port: int = 8000
    run_as_user: int = 10001
    max_tensor_parallel_size: int = 8
