"""The objects a ModelDeployment owns, built by pure functions of (resource, plan).

    Deployment           the runtime pods: `brim serve` with the plan's flags, pinned to the
                         planned GPU class, hardened, probed on /health
    Service              port 8000, named http (the OpenAI API and /metrics)
    PodDisruptionBudget  when replicas > 1: one replica down at a time
    ServiceMonitor       when the cluster has prometheus-operator's API
    Job                  reads a pvc:// model's facts (no GPU) for the planner

`plan` is the resource's `status.plan` (camelCase, as the operator wrote it): children are
rebuilt from what was planned, so a restart of the operator or an edited child changes
nothing about the plan.
"""

from __future__ import annotations

import hashlib
import math

from brim.operator.inventory import GPU_RESOURCE, GPU_TOLERATION, UNLABELLED, PRODUCT_LABEL
from brim.operator.settings import OperatorSettings
from brim.operator.spec import GROUP, KIND, VERSION, DeploymentSpec

MODEL_DEPLOYMENT_LABEL = "brim.dev/model-deployment"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "brim-operator"
HTTP_PORT_NAME = "http"
SERVICE_PORT = 8000  # the ModelDeployment's in-cluster OpenAI endpoint
MODELS_MOUNT = "/models"
HF_HOME = "/cache/huggingface"


def selector(name: str) -> dict:
    """The labels that select a ModelDeployment's runtime pods."""
    return {MODEL_DEPLOYMENT_LABEL: name, COMPONENT_LABEL: "runtime"}


def selector_string(name: str) -> str:
    """status.selector, for the scale subresource (HPA, KEDA)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector(name).items()))


def labels(name: str, component: str = "runtime") -> dict:
    return {"app.kubernetes.io/name": "brim", "app.kubernetes.io/instance": name,
            COMPONENT_LABEL: component, MANAGED_BY_LABEL: MANAGED_BY,
            MODEL_DEPLOYMENT_LABEL: name}


def owner_reference(md: dict) -> dict:
    meta = md["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def _metadata(md: dict, name: str, component: str = "runtime") -> dict:
    return {"name": name, "namespace": md["metadata"]["namespace"],
            "labels": labels(md["metadata"]["name"], component),
            "ownerReferences": [owner_reference(md)]}


def endpoint(md: dict, settings: OperatorSettings) -> str:
    """The in-cluster OpenAI base URL of the ModelDeployment's Service."""
    meta = md["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{SERVICE_PORT}/v1"


# -- the runtime ----------------------------------------------------------------------------


def serve_args(spec: DeploymentSpec, plan: dict, settings: OperatorSettings) -> list[str]:
    """`brim serve`'s flags for this plan (one per planned number)."""
    args = ["serve", "--host", "0.0.0.0", "--port", str(settings.runtime_port),
            "--served-model-name", spec.served_model_name]
    model = spec.model
    if model.scheme == "hf":
        args += ["--model", f"hf://{model.repo}"]
        if model.revision:
            args += ["--revision", model.revision]
    elif model.scheme == "pvc":
        args += ["--model", f"{MODELS_MOUNT}/{model.path}"]
    args += ["--dtype", plan["dtype"], "--kv-cache-dtype", plan["kvCacheDtype"],
             "--max-model-len", str(plan["maxModelLen"]),
             "--block-size", str(plan["blockSize"]), "--max-num-seqs", str(plan["maxNumSeqs"]),
             "--max-num-batched-tokens", str(plan["maxNumBatchedTokens"])]
    if spec.quantization:
        args += ["--quantization", spec.quantization]
    if plan.get("device") == "cpu":
        args += ["--device", "cpu", "--num-gpu-blocks", str(plan["numGpuBlocks"])]
    else:
        args += ["--device", "cuda",
                 "--gpu-memory-utilization", f"{plan['gpuMemoryUtilization']:.2f}",
                 "--tensor-parallel-size", str(plan["tensorParallelSize"])]
    if not spec.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    # A runtime whose KV cache cannot hold max_model_len leaves its memory report here, for
    # the operator to plan again with (the container's terminationMessagePath).
    args += ["--memory-report-path", "/dev/termination-log"]
    # Drain in-flight requests on SIGTERM, finishing a few seconds inside the pod's grace.
    args += ["--shutdown-timeout", str(max(1, settings.termination_grace_seconds - 5))]
    return args + list(spec.extra_args)


def startup_failure_threshold(spec: DeploymentSpec, plan: dict,
                              settings: OperatorSettings, period_seconds: int) -> int:
    """Start-up probes allowed to fail: 2 minutes plus the time to read (and, from the hub,
    download) this replica's weights."""
    weights = int(plan.get("weightsBytes", 0)) * max(1, int(plan.get("tensorParallelSize", 1)))
    seconds = 120 + weights / settings.load_bytes_per_second
    if spec.model.scheme == "hf":
        seconds += weights / settings.hub_bytes_per_second
    return max(6, math.ceil(seconds / period_seconds))


def _env(spec: DeploymentSpec, settings: OperatorSettings) -> list[dict]:
    env = [{"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if spec.model.scheme == "hf":
        env.append({"name": "HF_HOME", "value": HF_HOME})
        if settings.hf_endpoint:
            env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
        if spec.model.token_secret:
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": spec.model.token_secret.name, "key": spec.model.token_secret.key}}})
    if spec.api_key_secret:
        env.append({"name": "BRIM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret.name, "key": spec.api_key_secret.key}}})
    return env


def _volumes(spec: DeploymentSpec, plan: dict) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): the writable places a read-only root filesystem needs, /dev/shm for
    tensor parallelism's shared memory, the hub cache or the model's claim."""
    volumes = [{"name": "tmp", "emptyDir": {}},
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}]
    if spec.model.scheme == "hf":
        volumes.append({"name": "hf-cache", "emptyDir": {}})
        mounts.append({"name": "hf-cache", "mountPath": "/cache"})
    elif spec.model.scheme == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {
            "claimName": spec.model.claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True})
    return volumes, mounts


def _resources(spec: DeploymentSpec, plan: dict, settings: OperatorSettings) -> dict:
    on_cpu = plan.get("device") == "cpu"
    resources = {kind: dict(values) for kind, values in
                 (spec.resources or (settings.cpu_resources if on_cpu else
                                     settings.gpu_resources)).items()}
    if not on_cpu:
        gpus = str(plan["tensorParallelSize"])
        resource = plan.get("gpuResource") or GPU_RESOURCE  # a MIG profile's, or whole GPUs
        resources.setdefault("limits", {})[resource] = gpus
        resources.setdefault("requests", {})[resource] = gpus
    return resources


def _scheduling(spec: DeploymentSpec, plan: dict, settings: OperatorSettings) -> dict:
    node_selector = {**spec.node_selector, **(plan.get("nodeSelector") or {})}
    pod = {"tolerations": [*([GPU_TOLERATION] if plan.get("device") != "cpu" else []),
                           *settings.tolerations, *spec.tolerations]}
    if node_selector:
        pod["nodeSelector"] = node_selector
    if plan.get("gpuProduct") == UNLABELLED:
        # GPU nodes without GPU Feature Discovery's labels: keep off the labelled ones.
        term = {"matchExpressions": [{"key": PRODUCT_LABEL, "operator": "DoesNotExist"}]}
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [term]}}}
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    return pod


def build_deployment(md: dict, spec: DeploymentSpec, plan: dict,
                     settings: OperatorSettings) -> dict:
    name = md["metadata"]["name"]
    volumes, mounts = _volumes(spec, plan)
    probe = {"httpGet": {"path": "/health", "port": HTTP_PORT_NAME}, "timeoutSeconds": 5}
    container = {
        "name": "runtime",
        "image": spec.image or settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["brim"],
        "args": serve_args(spec, plan, settings),
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": settings.runtime_port,
                   "protocol": "TCP"}],
        "env": _env(spec, settings),
        "resources": _resources(spec, plan, settings),
        "volumeMounts": mounts,
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold":
                         startup_failure_threshold(spec, plan, settings, 10)},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    uid = settings.run_as_user
    pod_spec = {
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,  # the runtime never calls the API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                            "fsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}},
        **_scheduling(spec, plan, settings),
    }
    # One replica: replace it (a surge pod would need a second set of GPUs that may not
    # exist). More: keep serving, one extra pod at a time.
    strategy = ({"type": "Recreate"} if spec.replicas <= 1 else
                {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1,
                                                            "maxUnavailable": 0}})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(md, name),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(name)},
            "strategy": strategy,
            "template": {"metadata": {"labels": labels(name)}, "spec": pod_spec},
        },
    }


def build_service(md: dict, settings: OperatorSettings) -> dict:
    name = md["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(md, name),
        "spec": {"type": "ClusterIP", "selector": selector(name),
                 "ports": [{"name": HTTP_PORT_NAME, "port": SERVICE_PORT,
                            "targetPort": HTTP_PORT_NAME, "protocol": "TCP"}]},
    }


def build_pdb(md: dict, spec: DeploymentSpec) -> dict | None:
    """One replica down at a time during node drains; none for a single replica (a PDB
    there would block drains for good)."""
    if spec.replicas <= 1:
        return None
    name = md["metadata"]["name"]
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _metadata(md, name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


def build_service_monitor(md: dict) -> dict:
    name = md["metadata"]["name"]
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": _metadata(md, name),
        "spec": {"selector": {"matchLabels": selector(name)},
                 "endpoints": [{"port": HTTP_PORT_NAME, "path": "/metrics", "interval": "15s"}]},
    }


# -- reading a pvc:// model's facts -----------------------------------------------------------


def inspect_job_name(md: dict, spec: DeploymentSpec) -> str:
    """One Job per model source: a new path or claim gets a new Job."""
    digest = hashlib.sha256(spec.model.cache_key.encode()).hexdigest()[:8]
    return f"{md['metadata']['name'][:45]}-facts-{digest}"


def build_inspect_job(md: dict, spec: DeploymentSpec, settings: OperatorSettings) -> dict:
    """A short Job, no GPU, that mounts the claim read-only and writes `brim facts` to its
    termination message."""
    uid = settings.run_as_user
    container = {
        "name": "facts",
        "image": settings.facts_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["brim", "facts", f"{MODELS_MOUNT}/{spec.model.path}",
                    "--output", "/dev/termination-log"],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(md, inspect_job_name(md, spec), "facts"),
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 300,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "metadata": {"labels": labels(md["metadata"]["name"], "facts")},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [{"name": "model", "persistentVolumeClaim": {
                        "claimName": spec.model.claim, "readOnly": True}}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": uid,
                                        "runAsGroup": uid, "fsGroup": uid,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "tolerations": list(settings.tolerations) + list(spec.tolerations),
                    **({"nodeSelector": spec.node_selector} if spec.node_selector else {}),
                },
            },
        },
    }
