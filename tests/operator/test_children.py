"""The children a ModelDeployment owns, as the pure builders make them: valid Kubernetes
objects (kubernetes-validate, strict), owned, pinned to the planned GPU class, hardened,
and running `brim serve` with exactly the plan's numbers."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from brim.operator import children as ch
from brim.operator.inventory import gpu_classes
from brim.operator.planning import decide
from brim.operator.settings import OperatorSettings
from brim.operator.spec import parse_spec
from brim.operator.status import plan_status
from tests.crd_schema import load_crd, validate_against_crd
from tests.operator.planning_helpers import (KUBERNETES_VERSION, facts, gpu_node,
                                             model_deployment)

CRDS = Path(__file__).parents[1] / "data" / "crds"
SETTINGS = OperatorSettings(runtime_image="registry.example/brim-runtime:test")


def _planned(md: dict, nodes: list[dict], model: str = "Llama-3.1-8B-Instruct"):
    spec = parse_spec(md)
    decision = decide(spec, facts(model), gpu_classes(nodes), max_tensor_parallel_size=8)
    assert decision.fits, decision.message
    return spec, plan_status(decision)


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.fixture
def gpu_plan():
    md = model_deployment("llama", "serving", replicas=2,
                          model={"uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
                                 "revision": "0e9e39f", "tokenSecretRef": {"name": "hf",
                                                                           "key": "token"}},
                          engine={"maxModelLen": "16k", "enablePrefixCaching": False,
                                  "extraArgs": ["--max-queue-len", "64"]},
                          apiKeySecretRef={"name": "api", "key": "key"},
                          nodeSelector={"zone": "a"}, priorityClassName="inference")
    spec, plan = _planned(md, [gpu_node("l4", "NVIDIA-L4", 4, 23034, labels={"zone": "a"})])
    return md, spec, plan


def test_every_child_is_a_valid_object_owned_by_the_resource(gpu_plan):
    md, spec, plan = gpu_plan
    objects = [ch.build_deployment(md, spec, plan, SETTINGS), ch.build_service(md, SETTINGS),
               ch.build_pdb(md, spec)]
    for obj in objects:
        _validate(obj)
        assert obj["metadata"]["namespace"] == "serving"
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment", "name": "llama",
            "uid": "uid-llama", "controller": True, "blockOwnerDeletion": True}]
        assert obj["metadata"]["labels"][ch.MANAGED_BY_LABEL] == "brim-operator"
    monitor = ch.build_service_monitor(md)
    crd = load_crd(CRDS / "monitoring.coreos.com_servicemonitors.yaml")
    assert validate_against_crd(crd, monitor) == []


def test_the_deployment_runs_the_plan_pinned_to_its_gpu_class(gpu_plan):
    md, spec, plan = gpu_plan
    deployment = ch.build_deployment(md, spec, plan, SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]

    def flag(name):
        return args[args.index(name) + 1]

    assert container["command"] == ["brim"] and args[0] == "serve"
    assert (flag("--max-model-len"), flag("--tensor-parallel-size"), flag("--dtype")) == (
        str(plan["maxModelLen"]), str(plan["tensorParallelSize"]), "bfloat16")
    assert flag("--gpu-memory-utilization") == f"{plan['gpuMemoryUtilization']:.2f}"
    assert flag("--model") == "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert flag("--revision") == "0e9e39f" and flag("--served-model-name") == "llama"
    assert flag("--memory-report-path") == "/dev/termination-log"
    assert "--no-enable-prefix-caching" in args and args[-2:] == ["--max-queue-len", "64"]
    assert flag("--shutdown-timeout") == str(SETTINGS.termination_grace_seconds - 5)
    # The runtime's own parser reads every flag the operator writes, to the planned values.
    from brim.runtime.cli import build_parser

    parsed = build_parser(args).parse_args(args)
    assert (parsed.max_model_len, parsed.tensor_parallel_size, parsed.dtype) == (
        str(plan["maxModelLen"]), plan["tensorParallelSize"], "bfloat16")
    assert parsed.gpu_memory_utilization == pytest.approx(plan["gpuMemoryUtilization"])
    assert (parsed.max_num_seqs, parsed.block_size, parsed.enable_prefix_caching) == (
        plan["maxNumSeqs"], plan["blockSize"], False)
    assert parsed.memory_report_path == "/dev/termination-log"
    assert pod["nodeSelector"] == {"zone": "a", "nvidia.com/gpu.product": "NVIDIA-L4",
                                   "nvidia.com/gpu.memory": "23034"}
    gpus = str(plan["tensorParallelSize"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert pod["priorityClassName"] == "inference"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["BRIM_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "api", "key": "key"}}
    assert deployment["spec"]["selector"]["matchLabels"] == ch.selector("llama")
    assert ch.selector_string("llama") == \
        "app.kubernetes.io/component=runtime,brim.dev/model-deployment=llama"


def test_the_runtime_pod_is_hardened_and_probed(gpu_plan):
    md, spec, plan = gpu_plan
    pod = ch.build_deployment(md, spec, plan, SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm" and mounts["/tmp"] == "tmp" and "/cache" in mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # 16 GB of weights from the hub: well over the 2-minute base allowance.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= \
        120 + plan["weightsBytes"] / SETTINGS.hub_bytes_per_second


def test_the_startup_allowance_grows_with_the_weights():
    md = model_deployment("m", model={"uri": "pvc://models/llama"}, engine={"maxModelLen": "8k"})
    small_spec, small = _planned(md, [gpu_node("h", "NVIDIA-H100-80GB-HBM3", 8, 81559)],
                                 "SmolLM2-135M-Instruct")
    big_spec, big = _planned(md, [gpu_node("h", "NVIDIA-H100-80GB-HBM3", 8, 81559)],
                             "Llama-3.1-70B-Instruct")
    threshold = ch.startup_failure_threshold
    assert threshold(big_spec, big, SETTINGS, 10) > threshold(small_spec, small, SETTINGS, 10)


def test_a_pvc_model_is_mounted_read_only_and_read_by_a_job():
    md = model_deployment("qwen", model={"uri": "pvc://models/qwen2/7b-instruct"},
                          engine={"maxModelLen": "8k"})
    spec, plan = _planned(md, [gpu_node("h", "NVIDIA-H100-80GB-HBM3", 1, 81559)],
                          "Qwen2-7B-Instruct")
    deployment = ch.build_deployment(md, spec, plan, SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/qwen2/7b-instruct"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models",
                                                       "readOnly": True}} in pod["volumes"]
    _validate(deployment)
    job = ch.build_inspect_job(md, spec, SETTINGS)
    _validate(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["brim", "facts", "/models/qwen2/7b-instruct", "--output",
                                    "/dev/termination-log"]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["volumeMounts"][0]["readOnly"] is True
    other = model_deployment("qwen", model={"uri": "pvc://models/qwen2/other"})
    assert ch.inspect_job_name(other, parse_spec(other)) != ch.inspect_job_name(md, spec)


def test_a_cpu_deployment_gets_the_exact_block_count_and_no_gpu():
    md = model_deployment("smol", model={"uri": "bundled"}, device="cpu",
                          resources={"requests": {"cpu": "1", "memory": "2Gi"},
                                     "limits": {"memory": "2Gi"}},
                          engine={"maxModelLen": "4k", "maxNumSeqs": 8})
    spec, plan = _planned(md, [], "SmolLM2-135M-Instruct")
    deployment = ch.build_deployment(md, spec, plan, SETTINGS)
    _validate(deployment)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--num-gpu-blocks") + 1] == str(plan["numGpuBlocks"])
    assert "--model" not in args  # the image's bundled model
    from brim.runtime.cli import build_parser

    parsed = build_parser(args).parse_args(args)
    assert (parsed.device, parsed.num_gpu_blocks) == ("cpu", plan["numGpuBlocks"])
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert "nodeSelector" not in deployment["spec"]["template"]["spec"]


def test_one_replica_has_no_pdb_and_is_replaced_not_surged(gpu_plan):
    md, spec, plan = gpu_plan
    single = parse_spec(model_deployment("llama", "serving", replicas=1))
    assert ch.build_pdb(md, single) is None
    assert ch.build_deployment(md, single, plan, SETTINGS)["spec"]["strategy"] == {
        "type": "Recreate"}
    many = ch.build_deployment(md, spec, plan, SETTINGS)["spec"]["strategy"]
    assert many["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_fp8_weights_and_kv_cache_reach_the_runtime_and_stretch_the_plan():
    """spec.engine.quantization/kvCacheDtype: planned (half the weight and KV bytes) and
    passed to `brim serve` as flags its own parser reads."""
    nodes = [gpu_node("l4", "NVIDIA-L4", 1, 23034)]
    engine = {"maxModelLen": "auto"}
    _, plain = _planned(model_deployment("llama", engine=engine), nodes)
    md = model_deployment("llama", engine={**engine, "kvCacheDtype": "fp8",
                                           "quantization": "fp8"})
    spec, plan = _planned(md, nodes)

    assert plan["kvBytesPerToken"] * 2 == plain["kvBytesPerToken"]
    assert plan["quantization"] == "fp8 (quantized while loading)"
    assert plan["weightsBytes"] < 0.6 * plain["weightsBytes"]
    assert plan["numGpuBlocks"] > 2 * plain["numGpuBlocks"]
    args = ch.build_deployment(md, spec, plan, SETTINGS)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    from brim.runtime.cli import build_parser

    parsed = build_parser(args).parse_args(args)
    assert (parsed.kv_cache_dtype, parsed.quantization) == ("fp8", "fp8")


def test_an_e5m2_kv_cache_is_refused_as_unsupported():
    from brim.operator.reconcile import _unsupported

    spec = parse_spec(model_deployment("llama", engine={"kvCacheDtype": "fp8_e5m2"}))
    assert "stores an FP8 KV cache as e4m3" in _unsupported(spec)
    assert _unsupported(parse_spec(model_deployment("llama",
                                                    engine={"kvCacheDtype": "fp8"}))) is None
