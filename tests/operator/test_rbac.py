"""The chart's ClusterRole grants exactly what the operator uses: drive the operator through
every path that calls the API (hub facts with a token secret, a pvc:// Job that succeeds and
one that fails, a PDB created and removed, a ServiceMonitor when its API exists, children
restored, events, pods measured), record each request's RBAC (group, resource, verb), and
compare with the rendered ClusterRole both ways: nothing missing, nothing unused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import kopf
import kopf.testing
import yaml

from brim.operator.handlers import register
from tests.hub_fixtures import fake_hub, write_tiny_llama  # noqa: F401
from tests.operator.operator_fixtures import (CRD, H100_NODE, L4_NODE, SETTINGS, add_gpu_nodes,
                                              eventually)
from tests.operator.test_operator import _play_job_controller, llama_spec
from tests.tools import helm

ROOT = Path(__file__).parents[2]
SERVICE_MONITOR_CRD = ROOT / "tests" / "data" / "crds" / "monitoring.coreos.com_servicemonitors.yaml"


def chart_permissions() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the chart's ClusterRole grants, expanded."""
    rendered = subprocess.run([str(helm()), "template", "brim", str(ROOT / "charts" / "brim")],
                              capture_output=True, text=True, check=True).stdout
    roles = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "ClusterRole"]
    assert len(roles) == 1, [r["metadata"]["name"] for r in roles]
    granted = set()
    for rule in roles[0]["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    return granted


def _planned(kube, namespace, name, status="True", reason=None, timeout=30):
    def matches(md):
        return md and any(c["type"] == "Planned" and c["status"] == status
                          and (reason is None or c["reason"] == reason)
                          and c.get("observedGeneration") == md["metadata"]["generation"]
                          for c in (md.get("status") or {}).get("conditions") or [])
    return kube.wait_for("md", name, matches, namespace=namespace, timeout=timeout)


def _md(namespace, name, spec):
    return {"apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_the_cluster_role_is_what_the_operator_uses(kube, fake_hub, tmp_path, monkeypatch):
    kube.apply(CRD.read_text())
    kube.apply(SERVICE_MONITOR_CRD.read_text())  # the ServiceMonitor API exists
    add_gpu_nodes(kube, "l4", *L4_NODE, count=1, num_gpus=1)
    add_gpu_nodes(kube, "h100", *H100_NODE, count=1, num_gpus=8)
    namespace = kube.create_namespace("rbac")
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    kube.audit.clear()
    registry = kopf.OperatorRegistry()
    register(registry, SETTINGS)
    with kopf.testing.KopfRunner(["run", "-A", "--standalone"], registry=registry,
                                 timeout=60) as runner:
        # A hub model read with its token secret, two replicas (a PDB), a ServiceMonitor.
        folder = write_tiny_llama(tmp_path / "tiny")
        fake_hub.add_repo("acme/tiny", folder, token="hf_right")
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"},
                     "data": {"token": "aGZfcmlnaHQ="}}, namespace)
        kube.apply(_md(namespace, "hub", {"model": {"uri": "hf://acme/tiny",
                                                    "tokenSecretRef": {"name": "hf"}},
                                          "replicas": 2}), namespace)
        _planned(kube, namespace, "hub")
        eventually(lambda: kube.get("servicemonitors.monitoring.coreos.com", "hub", namespace)
                   and kube.get("poddisruptionbudgets.policy", "hub", namespace))
        # Edited and deleted children come back; scaled to one, the PDB goes.
        kube.patch("poddisruptionbudgets.policy", "hub", {"spec": {"maxUnavailable": 2}},
                   namespace=namespace)
        eventually(lambda: kube.get("poddisruptionbudgets.policy", "hub", namespace)["spec"][
            "maxUnavailable"] == 1)
        kube.patch("services", "hub", {"spec": {"ports": [{"name": "x", "port": 81}]}},
                   namespace=namespace)
        eventually(lambda: kube.get("services", "hub", namespace)["spec"]["ports"][0][
            "port"] == 8000)
        kube.patch("md", "hub", {"spec": {"replicas": 1}}, namespace=namespace)
        eventually(lambda: kube.get("poddisruptionbudgets.policy", "hub", namespace) is None)
        kube.delete("services", "hub", namespace=namespace)
        kube.patch("servicemonitors.monitoring.coreos.com", "hub",
                   {"spec": {"endpoints": [{"port": "other"}]}}, namespace=namespace)
        eventually(lambda: kube.get("services", "hub", namespace) and kube.get(
            "servicemonitors.monitoring.coreos.com", "hub", namespace)["spec"]["endpoints"][0][
            "port"] == "http")
        # Pods run and report (the operator reads their status and their /memory).
        kube.rollout("hub", namespace, ready=True)
        # A pvc:// model whose inspect Job succeeds, and one whose Job fails with no message
        # (its pod's log is read for the error).
        kube.apply(_md(namespace, "vol", {"model": {"uri": "pvc://models/tiny"},
                                          "gpu": {"products": ["NVIDIA-L4"]}}), namespace)
        eventually(lambda: kube.list("jobs.batch", namespace))
        _play_job_controller(kube, namespace, folder)
        _planned(kube, namespace, "vol")
        kube.apply(_md(namespace, "broken", {"model": {"uri": "pvc://models/missing"},
                                             "gpu": {"products": ["NVIDIA-L4"]}}), namespace)
        eventually(lambda: kube.list("jobs.batch", namespace))
        _play_job_controller(kube, namespace, tmp_path / "missing", message="")
        _planned(kube, namespace, "broken", "False", "ModelUnreadable")
        # An inline model that does not fit anywhere (events, no children).
        big = llama_spec()
        big["gpu"] = {"products": ["NVIDIA-L4"]}
        big["model"]["config"]["num_hidden_layers"] = 400
        kube.apply(_md(namespace, "big", big), namespace)
        _planned(kube, namespace, "big", "False", "DoesNotFit")
        # Deleting a resource: kopf removes its finalizer.
        kube.delete("md", "big", namespace=namespace)
        eventually(lambda: kube.get("md", "big", namespace) is None)
    assert runner.exit_code == 0, runner.output
    used = kube.audit.permissions()
    if os.environ.get("BRIM_RBAC_PRINT"):
        print(sorted(used))
    granted = chart_permissions()
    assert used - granted == set(), f"the operator needs, the chart does not grant: {used - granted}"
    assert granted - used == set(), f"the chart grants, the operator never uses: {granted - used}"
