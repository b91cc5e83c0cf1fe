"""A ModelDeployment's spec, read into typed values with the CRD's defaults applied.

The CRD's schema and CEL rules refuse most bad specs at `kubectl apply`. What a structural
schema cannot say (gpuMemoryUtilization is "auto" or a number; "1.1K" is not a whole number
of tokens; a quantity's value) is checked here, and refused with the field's path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from brim.runtime.planner.dtypes import KV_CACHE_DTYPE_BYTES, MODEL_DTYPE_BYTES
from brim.runtime.planner.lengths import is_auto, parse_token_count
from brim.runtime.planner.quantization import METHODS as QUANTIZATION_METHODS

GROUP = "brim.dev"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
KIND = "ModelDeployment"

_HF = re.compile(r"^hf://([A-Za-z0-9][-A-Za-z0-9._]{0,95})/([A-Za-z0-9][-A-Za-z0-9._]{0,95})$")
_PVC = re.compile(r"^pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)((/[-A-Za-z0-9._+@=]+)+)$")


class SpecError(ValueError):
    """A spec the schema let through but brim cannot run; the message names the field."""


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where the model comes from (spec.model.uri and what goes with it).

    scheme: "hf", "pvc" or "bundled".
    repo: hf's <org>/<name>; claim, path: pvc's claim and the folder inside it.
    config: an inline config.json (used instead of reading the model's own).
    weights_bytes: weight bytes as served, on one GPU without TP (with an inline config).
    """

    uri: str
    scheme: str
    repo: str | None = None
    revision: str | None = None
    token_secret: SecretRef | None = None
    claim: str | None = None
    path: str | None = None
    config: dict | None = None
    weights_bytes: int | None = None

    @property
    def cache_key(self) -> str:
        return f"{self.uri}@{self.revision or ''}"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """spec, with defaults: every field maps onto one `brim serve` flag or one pod setting."""

    name: str
    namespace: str
    model: ModelSource
    served_model_name: str
    replicas: int = 1
    device: str = "gpu"
    gpu_products: tuple[str, ...] = ()
    gpu_count: int | str = "auto"
    gpu_memory_bytes: int | None = None
    max_model_len: int | str = "auto"
    min_model_len: int | None = None
    gpu_memory_utilization: float | str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    enable_prefix_caching: bool = True
    block_size: int = 16
    extra_args: tuple[str, ...] = ()
    resources: dict = field(default_factory=dict)
    node_selector: dict = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    priority_class_name: str | None = None
    image: str | None = None
    api_key_secret: SecretRef | None = None


def parse_quantity_bytes(value, where: str) -> int:
    """Bytes of a Kubernetes quantity ("24Gi", "81559Mi", "80G", 1024)."""
    from kubernetes.utils.quantity import parse_quantity

    try:
        number = parse_quantity(value)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: cannot read {value!r} as a quantity of bytes "
                        f"(write e.g. 24Gi or 81559Mi): {exc}") from None
    if number < 0 or number != int(number):
        raise SpecError(f"{where}: {value!r} is not a whole, non-negative number of bytes")
    return int(number)


def _token_count(value, where: str) -> int:
    try:
        return parse_token_count(value)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _secret_ref(ref: dict | None, default_key: str) -> SecretRef | None:
    if not ref:
        return None
    return SecretRef(ref["name"], ref.get("key") or default_key)


def parse_model(model: dict) -> ModelSource:
    uri = str(model.get("uri", "")).strip()
    common = dict(uri=uri, revision=model.get("revision") or None,
                  token_secret=_secret_ref(model.get("tokenSecretRef"), "token"),
                  config=model.get("config") or None)
    if model.get("weightsBytes") is not None:
        common["weights_bytes"] = parse_quantity_bytes(model["weightsBytes"],
                                                       "spec.model.weightsBytes")
    if uri == "bundled":
        return ModelSource(scheme="bundled", **common)
    if match := _HF.match(uri):
        return ModelSource(scheme="hf", repo=f"{match[1]}/{match[2]}", **common)
    if match := _PVC.match(uri):
        return ModelSource(scheme="pvc", claim=match[1], path=match[3].lstrip("/"), **common)
    raise SpecError(f"spec.model.uri: {uri!r} is not hf://<org>/<name>, pvc://<claim>/<path> "
                    "or bundled")


def parse_spec(body: dict, *, default_gpu_memory_utilization: float | str = "auto"
               ) -> DeploymentSpec:
    """The typed spec of a ModelDeployment object (defaults applied as the CRD states them)."""
    metadata, spec = body.get("metadata") or {}, body.get("spec") or {}
    name = metadata.get("name", "")
    model = parse_model(spec.get("model") or {})
    gpu = spec.get("gpu") or {}
    engine = spec.get("engine") or {}
    device = spec.get("device") or "gpu"

    count = gpu.get("count", "auto")
    if not is_auto(count):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 8:
            raise SpecError(f"spec.gpu.count: {count!r} is not auto or an integer from 1 to 8")

    utilization = engine.get("gpuMemoryUtilization", default_gpu_memory_utilization)
    if not is_auto(utilization):
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) \
                or not 0.5 <= utilization <= 0.99:
            raise SpecError(f"spec.engine.gpuMemoryUtilization: {utilization!r} is not auto or "
                            "a number from 0.5 to 0.99")
        utilization = float(utilization)

    max_len = engine.get("maxModelLen", "auto")
    max_len = "auto" if is_auto(max_len) else _token_count(max_len, "spec.engine.maxModelLen")
    min_len = engine.get("minModelLen")
    min_len = None if min_len is None else _token_count(min_len, "spec.engine.minModelLen")
    if min_len is not None and max_len != "auto" and min_len > max_len:
        raise SpecError(f"spec.engine.minModelLen ({min_len}) must not exceed "
                        f"spec.engine.maxModelLen ({max_len})")
    batched = engine.get("maxNumBatchedTokens")

    dtype = str(engine.get("dtype", "auto"))
    if dtype != "auto" and dtype not in MODEL_DTYPE_BYTES:
        raise SpecError(f"spec.engine.dtype: {dtype!r} is not auto or one of "
                        f"{', '.join(MODEL_DTYPE_BYTES)}")
    kv_dtype = str(engine.get("kvCacheDtype", "auto"))
    if kv_dtype != "auto" and kv_dtype not in KV_CACHE_DTYPE_BYTES:
        raise SpecError(f"spec.engine.kvCacheDtype: {kv_dtype!r} is not auto or one of "
                        f"{', '.join(KV_CACHE_DTYPE_BYTES)}")

    quantization = engine.get("quantization")
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise SpecError(f"spec.engine.quantization: {quantization!r} is not one of "
                        f"{', '.join(QUANTIZATION_METHODS)} (leave it unset to serve the "
                        "checkpoint's own scheme)")

    return DeploymentSpec(
        name=name,
        namespace=metadata.get("namespace", "default"),
        model=model,
        served_model_name=(spec.get("model") or {}).get("servedModelName") or name,
        replicas=int(spec.get("replicas", 1)),
        device=device,
        gpu_products=tuple(gpu.get("products") or ()),
        gpu_count="auto" if is_auto(count) else count,
        gpu_memory_bytes=(parse_quantity_bytes(gpu["memory"], "spec.gpu.memory")
                          if gpu.get("memory") is not None else None),
        max_model_len=max_len,
        min_model_len=min_len,
        gpu_memory_utilization=utilization,
        max_num_seqs=engine.get("maxNumSeqs"),
        max_num_batched_tokens=(None if batched is None else
                                _token_count(batched, "spec.engine.maxNumBatchedTokens")),
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        quantization=quantization,
        enable_prefix_caching=bool(engine.get("enablePrefixCaching", True)),
        block_size=int(engine.get("blockSize", 16)),
        extra_args=tuple(engine.get("extraArgs") or ()),
        resources=dict(spec.get("resources") or {}),
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=tuple(spec.get("tolerations") or ()),
        priority_class_name=spec.get("priorityClassName") or None,
        image=spec.get("image") or None,
        api_key_secret=_secret_ref(spec.get("apiKeySecretRef"), "api-key"),
    )


def memory_request_bytes(spec: DeploymentSpec) -> int | None:
    """The runtime container's memory (request, else limit): what a CPU plan sizes against."""
    for kind in ("requests", "limits"):
        value = (spec.resources.get(kind) or {}).get("memory")
        if value is not None:
            return parse_quantity_bytes(value, f"spec.resources.{kind}.memory")
    return None
