"""The tools the chart and monitoring tests stand on: helm, promtool, a real Prometheus, checkov
(offline) and the vendored third-party CRD schemas. Install them with .ci/tools/install-all.sh."""

import copy
import hashlib
import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import tools
from tests.crd_schema import load_crd, validate_against_crd

CRDS = Path(__file__).parent / "data" / "crds"

# One alerting and one recording rule: checked by promtool, loaded by Prometheus, and carried by
# the PrometheusRule below.
RULES = """\
groups:
  - name: brim
    rules:
      - alert: BrimKVCacheAlmostFull
        expr: brim_kv_cache_usage_ratio > 0.95
        for: 5m
        labels: {severity: warning}
        annotations: {summary: KV cache almost full}
      - record: model:brim_requests:rate5m
        expr: sum by (model) (rate(brim_requests_total[5m]))
"""


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=60, **kwargs
    )


# --- helm -----------------------------------------------------------------------------------


@pytest.fixture
def helm_env(tmp_path: Path) -> dict:
    """helm's cache, config and data under tmp_path, never the user's."""
    homes = {f"HELM_{d}_HOME": str(tmp_path / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}
    return {"PATH": "/usr/bin:/bin", **homes}


def test_helm_is_version_4():
    result = run(tools.helm(), "version", "--template", "{{.Version}}")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"v4\.\d+\.\d+", result.stdout), result.stdout


def test_helm_lints_and_renders_a_created_chart(tmp_path, helm_env):
    helm = tools.helm()
    assert run(helm, "create", "demo", cwd=tmp_path, env=helm_env).returncode == 0

    lint = run(helm, "lint", "demo", cwd=tmp_path, env=helm_env)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout

    rendered = run(helm, "template", "rel", "demo", "--namespace", "ns", cwd=tmp_path, env=helm_env)
    assert rendered.returncode == 0, rendered.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds == {
        ("ServiceAccount", "rel-demo"),
        ("Service", "rel-demo"),
        ("Deployment", "rel-demo"),
        ("Pod", "rel-demo-test-connection"),  # the chart's `helm test` hook
    }


def test_helm_lint_rejects_a_broken_chart(tmp_path, helm_env):
    helm = tools.helm()
    assert run(helm, "create", "demo", cwd=tmp_path, env=helm_env).returncode == 0
    with open(tmp_path / "demo" / "values.yaml", "a") as values:
        values.write("broken: [\n")

    lint = run(helm, "lint", "demo", cwd=tmp_path, env=helm_env)
    assert lint.returncode != 0
    assert "values.yaml: unable to parse YAML" in lint.stdout


# --- promtool and prometheus ----------------------------------------------------------------


def test_promtool_accepts_valid_rules(tmp_path):
    (tmp_path / "rules.yml").write_text(RULES)
    result = run(tools.promtool(), "check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path):
    (tmp_path / "rules.yml").write_text(RULES.replace("[5m]))", "[5m])"))
    result = run(tools.promtool(), "check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode == 1
    assert '"model:brim_requests:rate5m": could not parse expression' in result.stderr
    assert "unclosed left parenthesis" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def test_prometheus_starts_ready_with_the_rules_loaded(tmp_path):
    (tmp_path / "rules.yml").write_text(RULES)
    (tmp_path / "prometheus.yml").write_text("rule_files: [rules.yml]\nscrape_configs: []\n")
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen(
        [
            tools.prometheus(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://{address}/-/ready", timeout=1) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready after 15 s:\n" + (
                tmp_path / "prometheus.log"
            ).read_text()
            time.sleep(0.1)

        groups = get_json(f"http://{address}/api/v1/rules")["data"]["groups"]
        assert [(g["name"], [r["name"] for r in g["rules"]]) for g in groups] == [
            ("brim", ["BrimKVCacheAlmostFull", "model:brim_requests:rate5m"])
        ]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- checkov --------------------------------------------------------------------------------

HARDENED_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: brim}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: web
          image: registry.example.com/web@sha256:%s
          imagePullPolicy: Always
          ports: [{containerPort: 8080}]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            privileged: false
            capabilities: {drop: [ALL]}
          resources:
            requests: {cpu: 100m, memory: 128Mi}
            limits: {cpu: 500m, memory: 256Mi}
          livenessProbe: {httpGet: {path: /healthz, port: 8080}}
          readinessProbe: {httpGet: {path: /ready, port: 8080}}
---
# Without a NetworkPolicy selecting the pods, CKV2_K8S_6 fails.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: brim}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{ports: [{port: 8080}]}]
""" % ("0" * 64)

HARDENED_CONTAINERFILE = """\
FROM python:3.11-slim@sha256:%s
RUN useradd --uid 10001 app
USER app
HEALTHCHECK CMD ["python", "-c", "print('ok')"]
CMD ["python", "-c", "print('hello')"]
""" % ("0" * 64)


def failed_checks(report: dict, file_name: str) -> set[str]:
    return {
        check["check_id"]
        for check in report["results"]["failed_checks"]
        if check["file_path"].endswith("/" + file_name)
    }


def test_checkov_runs_offline():
    result = tools.run_checkov("--version", cwd=tools.TOOLS_DIR)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", result.stdout)
    assert tools.OFFLINE_GUARD_MARK not in result.stderr


def test_checkov_without_the_offline_flags_is_caught_reaching_out(tmp_path):
    (tmp_path / "deployment.yaml").write_text(HARDENED_DEPLOYMENT)
    result = tools.run_checkov(
        "--framework", "kubernetes", "-f", "deployment.yaml", "--quiet", cwd=tmp_path, offline=False
    )
    assert tools.OFFLINE_GUARD_MARK + " refused socket.getaddrinfo" in result.stderr


def test_checkov_passes_a_hardened_deployment_and_flags_a_privileged_one(tmp_path):
    (tmp_path / "hardened.yaml").write_text(HARDENED_DEPLOYMENT)
    privileged = HARDENED_DEPLOYMENT.replace("privileged: false", "privileged: true")
    (tmp_path / "privileged.yaml").write_text(privileged.replace("name: web", "name: other"))

    report = tools.checkov_scan("kubernetes", tmp_path, cwd=tmp_path)

    # Each Deployment counts twice, as itself and as its pod template, plus the NetworkPolicies.
    assert report["summary"]["resource_count"] == 6
    assert failed_checks(report, "hardened.yaml") == set()
    # CKV_K8S_16: privileged containers; CKV2_K8S_6: the NetworkPolicy selects app=web only.
    assert "CKV_K8S_16" in failed_checks(report, "privileged.yaml")


def test_checkov_scans_dockerfiles_but_not_files_named_containerfile(tmp_path):
    # checkov reads only files named like Dockerfile, *.Dockerfile or Dockerfile.*.
    (tmp_path / "runtime.Dockerfile").write_text(HARDENED_CONTAINERFILE)
    (tmp_path / "root.Dockerfile").write_text("FROM python:latest\nCMD [\"python\"]\n")

    report = tools.checkov_scan("dockerfile", tmp_path, cwd=tmp_path)
    assert failed_checks(report, "runtime.Dockerfile") == set()
    # CKV_DOCKER_2: no HEALTHCHECK; CKV_DOCKER_3: no USER; CKV_DOCKER_7: the latest tag.
    assert failed_checks(report, "root.Dockerfile") == {
        "CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_7"
    }

    (tmp_path / "Containerfile").write_text(HARDENED_CONTAINERFILE)
    with pytest.raises(RuntimeError, match="found nothing to scan as dockerfile"):
        tools.checkov_scan("dockerfile", tmp_path / "Containerfile", cwd=tmp_path)


# --- vendored CRD schemas -------------------------------------------------------------------

SERVICE_MONITOR = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "ServiceMonitor",
    "metadata": {"name": "llama-8b", "namespace": "brim", "labels": {"release": "prometheus"}},
    "spec": {
        "selector": {"matchLabels": {"brim.dev/model-deployment": "llama-8b"}},
        "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
    },
}
PROMETHEUS_RULE = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "brim", "namespace": "brim"},
    "spec": yaml.safe_load(RULES),
}
SCALED_OBJECT = {
    "apiVersion": "keda.sh/v1alpha1",
    "kind": "ScaledObject",
    "metadata": {"name": "llama-8b", "namespace": "brim"},
    "spec": {
        "scaleTargetRef": {
            "apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment", "name": "llama-8b"
        },
        "minReplicaCount": 1,
        "maxReplicaCount": 4,
        "triggers": [
            {
                "type": "prometheus",
                "metadata": {
                    "serverAddress": "http://prometheus.monitoring:9090",
                    "query": "sum(brim_num_requests_waiting{model_deployment='llama-8b'})",
                    "threshold": "8",
                },
            }
        ],
    },
}

# (CRD file, a valid object, a misspelt field and what it should have been, a wrongly typed field)
CASES = [
    pytest.param(
        "monitoring.coreos.com_servicemonitors.yaml", SERVICE_MONITOR,
        (("spec", "endpoints", 0, "intervall"), "15s", "interval"),
        (("spec", "endpoints", 0, "port"), 8080),
        id="ServiceMonitor",
    ),
    pytest.param(
        "monitoring.coreos.com_prometheusrules.yaml", PROMETHEUS_RULE,
        (("spec", "groups", 0, "rules", 0, "annotation"), {"summary": "x"}, "annotations"),
        (("spec", "groups", 0, "rules", 0, "labels", "severity"), 3),
        id="PrometheusRule",
    ),
    pytest.param(
        "keda.sh_scaledobjects.yaml", SCALED_OBJECT,
        (("spec", "maxReplicaCnt"), 4, "maxReplicaCount"),
        (("spec", "triggers", 0, "metadata", "threshold"), 8),
        id="ScaledObject",
    ),
]


def with_field(obj: dict, path: tuple, value) -> dict:
    obj = copy.deepcopy(obj)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return obj


def field_path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def test_vendored_crds_are_unmodified():
    readme = (CRDS / "README.md").read_text()
    files = sorted(CRDS.glob("*.yaml"))
    assert len(files) == 3
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"{digest}  {path.name}" in readme, f"{path.name} differs from the vendored copy"


@pytest.mark.parametrize("crd_file, valid, misspelt, wrong_type", CASES)
def test_crd_accepts_a_valid_object(crd_file, valid, misspelt, wrong_type):
    crd = load_crd(CRDS / crd_file)
    assert crd["spec"]["names"]["kind"] == valid["kind"]
    assert validate_against_crd(crd, valid) == []


@pytest.mark.parametrize("crd_file, valid, misspelt, wrong_type", CASES)
def test_crd_rejects_a_misspelt_field(crd_file, valid, misspelt, wrong_type):
    path, value, meant = misspelt
    errors = validate_against_crd(load_crd(CRDS / crd_file), with_field(valid, path, value))
    assert errors == [f"{field_path(path)}: unknown field (did you mean {meant!r}?)"]


@pytest.mark.parametrize("crd_file, valid, misspelt, wrong_type", CASES)
def test_crd_rejects_a_wrongly_typed_field(crd_file, valid, misspelt, wrong_type):
    path, value = wrong_type
    errors = validate_against_crd(load_crd(CRDS / crd_file), with_field(valid, path, value))
    assert errors == [f"{field_path(path)}: {value!r} is not of type 'string'"]


def test_crd_rejects_an_unserved_version():
    crd = load_crd(CRDS / "monitoring.coreos.com_servicemonitors.yaml")
    v2 = {**SERVICE_MONITOR, "apiVersion": "monitoring.coreos.com/v2"}
    errors = validate_against_crd(crd, v2)
    assert errors == [
        "apiVersion: 'monitoring.coreos.com/v2' is not served by "
        "servicemonitors.monitoring.coreos.com (served: monitoring.coreos.com/v1)"
    ]


def test_crd_int_or_string_field():
    crd = load_crd(CRDS / "monitoring.coreos.com_servicemonitors.yaml")
    by_number = with_field(SERVICE_MONITOR, ("spec", "endpoints", 0, "targetPort"), 8080)
    by_name = with_field(SERVICE_MONITOR, ("spec", "endpoints", 0, "targetPort"), "http")
    as_list = with_field(SERVICE_MONITOR, ("spec", "endpoints", 0, "targetPort"), [8080])
    assert validate_against_crd(crd, by_number) == []
    assert validate_against_crd(crd, by_name) == []
    assert validate_against_crd(crd, as_list) == [
        "spec.endpoints[0].targetPort: [8080] is not of type 'integer', 'string'"
    ]


# The extensions the vendored CRDs do not exercise, on a CRD made for it.
EXTENSIONS_CRD = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                comment: {type: string, nullable: true}
                ratio: {type: number, minimum: 0, exclusiveMinimum: true}
                extra: {type: object, x-kubernetes-preserve-unknown-fields: true,
                        properties: {known: {type: string}}}
                size: {type: integer}
                unit: {type: string}
              oneOf:
                - required: [size]
                  properties: {size: {minimum: 1}}
                - required: [unit]
""")


def test_crd_kubernetes_extensions():
    widget = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {
            "comment": None, "ratio": 0.5, "extra": {"known": "k", "anything": [1]}, "size": 2
        },
    }
    assert validate_against_crd(EXTENSIONS_CRD, widget) == []
    assert validate_against_crd(EXTENSIONS_CRD, with_field(widget, ("spec", "ratio"), 0)) == [
        "spec.ratio: 0 is less than or equal to the minimum of 0"
    ]
    assert validate_against_crd(EXTENSIONS_CRD, with_field(widget, ("spec", "size"), 0)) == [
        "spec: {'comment': None, 'ratio': 0.5, 'extra': {'known': 'k', 'anything': [1]}, "
        "'size': 0} is not valid under any of the given schemas"
    ]
