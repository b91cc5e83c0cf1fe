"""Render charts/brim with helm, offline, for the chart tests.

The tests render a copy of the chart in a temporary folder: where the monitoring files the chart
packages (dashboards/*.json, rules/brim-rules.yaml) do not exist yet, the copy gets a small
placeholder of each, so every template renders; once they exist, the copy carries the real ones.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests import tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "brim"
NAMESPACE = "brim-system"
RELEASE = "brim"

PLACEHOLDER_DASHBOARD = '{"title": "brim (placeholder)", "uid": "brim-placeholder", "panels": []}\n'
PLACEHOLDER_RULES = """\
groups:
  - name: brim-placeholder
    rules:
      - alert: BrimPlaceholder
        expr: max by (namespace, model_name) (brim_kv_cache_usage_ratio) > 0.95
        for: 5m
        labels: {severity: warning}
        annotations: {summary: "{{ $labels.model_name }}: KV cache almost full"}
"""

# Every optional feature on, each with a value that shows in the output.
ALL_FEATURES = {
    "serviceMonitor": {"enabled": True, "namespace": "monitoring",
                       "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboards": {"enabled": True, "namespace": "monitoring", "folder": "LLMs"},
    "keda": {"enabled": True, "name": "llama-8b", "namespace": "ml", "threshold": 6,
             "minReplicas": 1, "maxReplicas": 3,
             "serverAddress": "http://prometheus.monitoring.svc:9090"},
    "operator": {"watchNamespaces": ["ml", "research"],
                 "hfEndpoint": "https://hf-mirror.example.com"},
}


def copy_chart(dest: Path) -> Path:
    """A copy of charts/brim under `dest`, with placeholders for missing monitoring files."""
    chart = dest / "brim"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("__pycache__"))
    dashboards = chart / "dashboards"
    if not list(dashboards.glob("*.json")):
        dashboards.mkdir(exist_ok=True)
        (dashboards / "brim-placeholder.json").write_text(PLACEHOLDER_DASHBOARD)
    rules = chart / "rules" / "brim-rules.yaml"
    if not rules.is_file():
        rules.parent.mkdir(exist_ok=True)
        rules.write_text(PLACEHOLDER_RULES)
    return chart


def helm_env(home: Path) -> dict:
    """helm's cache, config and data under `home`, never the user's; no network needed."""
    return {"PATH": "/usr/bin:/bin",
            **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}


def helm(*args: str | Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools.helm()), *map(str, args)], env=helm_env(home),
                          capture_output=True, text=True, timeout=60)


def values_file(values: dict, folder: Path, name: str = "values.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def template(chart: Path, home: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """`helm template brim <chart> --namespace brim-system <args>`."""
    return helm("template", RELEASE, chart, "--namespace", NAMESPACE, *args, home=home)


def render(chart: Path, home: Path, *args: str | Path) -> tuple[str, list[dict]]:
    """The manifest text and its objects; fails with helm's error when it does not render."""
    result = template(chart, home, *args)
    if result.returncode != 0:
        raise AssertionError(f"helm template {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of `kind` (and `name`) among `objects`."""
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {kinds(objects)}"
    return found[0]


def kinds(objects: list[dict]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)
