"""Nodes and ModelDeployments as the operator's pure functions receive them."""

from __future__ import annotations

import json
from pathlib import Path

from brim.runtime.planner.facts import CheckpointFacts

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
KUBERNETES_VERSION = "1.31"  # what the chart declares (kubeVersion >= 1.28); schemas for it


def facts(name: str) -> CheckpointFacts:
    return CheckpointFacts(config=json.loads((CONFIGS / f"{name}.json").read_text()))


def gpu_node(name: str, product: str | None, num_gpus: int, memory_mib: int | None = None, *,
             taints=(), unschedulable=False, ready=True, labels=None) -> dict:
    node_labels = dict(labels or {})
    if product:
        node_labels["nvidia.com/gpu.product"] = product
    if memory_mib:
        node_labels["nvidia.com/gpu.memory"] = str(memory_mib)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": node_labels},
        "spec": {"unschedulable": unschedulable, "taints": list(taints)},
        "status": {"allocatable": {"nvidia.com/gpu": str(num_gpus), "cpu": "32",
                                   "memory": "128Gi"},
                   "capacity": {"nvidia.com/gpu": str(num_gpus), "cpu": "32",
                                "memory": "128Gi"},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def model_deployment(name: str = "llama", namespace: str = "default", **spec) -> dict:
    body = {"apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1},
            "spec": {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}, **spec}}
    return body
