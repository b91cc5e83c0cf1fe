"""The operator running (kopf, in this process) against the emulated cluster, and helpers that
play the parts of a cluster the emulator does not run: GPU nodes, the kubelet, the Job
controller.

Import the fixtures into a test module: `from tests.operator.operator_fixtures import operator`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import kopf
import kopf.testing
import pytest

from brim.operator.handlers import register
from brim.operator.settings import OperatorSettings
from tests.crds.validate import validate_model_deployment
from tests.operator.planning_helpers import CONFIGS, gpu_node

ROOT = Path(__file__).parents[2]
CRD = ROOT / "crds" / "modeldeployments.brim.dev.yaml"
# "Pods" that really serve run on their own loopback address (the operator reaches a pod at
# its IP and the runtime port).
POD_IP = "127.0.0.2"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Fast enough for tests: a resync every second instead of 30.
SETTINGS = OperatorSettings(runtime_image="registry.example/brim-runtime:test",
                            facts_image="registry.example/brim-operator:test",
                            resync_seconds=1.0, max_tensor_parallel_size=8,
                            runtime_port=_free_port(POD_IP))

L4_NODE = ("NVIDIA-L4", 23034)
H100_NODE = ("NVIDIA-H100-80GB-HBM3", 81559)


class Operator:
    """The running operator and what tests do around it."""

    def __init__(self, kube, runner, settings: OperatorSettings) -> None:
        self.kube = kube
        self.runner = runner
        self.settings = settings

    def apply_md(self, namespace: str, name: str, spec: dict) -> dict:
        return self.kube.apply({"apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment",
                                "metadata": {"name": name, "namespace": namespace},
                                "spec": spec}, namespace)[0]

    def wait_md(self, namespace: str, name: str, predicate: Callable[[dict], object],
                timeout: float = 20.0) -> dict:
        return self.kube.wait_for("md", name, lambda o: o is not None and predicate(o),
                                  namespace=namespace, timeout=timeout)

    def wait_condition(self, namespace: str, name: str, type: str, status: str,
                       reason: str | None = None, timeout: float = 20.0) -> dict:
        def matches(md):
            for c in (md.get("status") or {}).get("conditions") or []:
                if c["type"] == type and c["status"] == status and \
                        (reason is None or c["reason"] == reason) and \
                        c.get("observedGeneration") == md["metadata"]["generation"]:
                    return True
            return False
        return self.wait_md(namespace, name, matches, timeout)


@pytest.fixture(autouse=True)
def validated(request):
    """Custom resources are admitted only if valid (schema, defaults, CEL), per test: the
    emulator's validators are cleared after each test."""
    if "operator" not in request.fixturenames:
        yield
        return
    kube = request.getfixturevalue("kube")
    remove = kube.add_validator("md", lambda obj, old: validate_model_deployment(obj, old=old))
    yield
    remove()


def llama_config() -> dict:
    return json.loads((CONFIGS / "Llama-3.1-8B-Instruct.json").read_text())


def add_gpu_nodes(kube, prefix: str, product: str, memory_mib: int | None, count: int,
                  num_gpus: int, **kwargs) -> list[str]:
    names = []
    for i in range(count):
        node = gpu_node(f"{prefix}-{i}", product, num_gpus, memory_mib, **kwargs)
        name = node["metadata"]["name"]
        if kube.get("nodes", name) is None:
            kube.create(node)
            kube.set_status("nodes", name, node["status"])  # the kubelet reports it
        names.append(name)
    return names


@pytest.fixture(scope="module")
def operator(kube, tmp_path_factory):
    """The CRD installed, one L4 node and one 8-GPU H100 node, and brim's operator running
    for the whole module (modules that use it import `validated` too)."""
    import os

    kube.apply(CRD.read_text())
    add_gpu_nodes(kube, "l4", *L4_NODE, count=1, num_gpus=1)
    add_gpu_nodes(kube, "h100", *H100_NODE, count=1, num_gpus=8)
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kube.kubeconfig)
    registry = kopf.OperatorRegistry()
    register(registry, SETTINGS)
    try:
        with kopf.testing.KopfRunner(["run", "-A", "--standalone"], registry=registry,
                                     timeout=60) as runner:
            yield Operator(kube, runner, SETTINGS)
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
    assert runner.exit_code == 0, runner.output


def eventually(check: Callable[[], object], timeout: float = 20.0, interval: float = 0.1):
    """Poll until check() returns something true (and return it), or fail with its last value."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not true within {timeout} s: last {value!r}")
        time.sleep(interval)
