"""The Helm chart charts/brim: it lints, renders valid objects for Kubernetes 1.28 and the newest,
its custom resources fit their CRDs, its values schema refuses typos, its RBAC is the operator's
exact needs, its operator flags parse with brim's own parser, and checkov finds nothing.

The chart is rendered once per module (with default values and with every optional feature on)
and the tests share the output; see tests/charts/render.py for the copy they render.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from brim.operator import children
from brim.operator.settings import DEFAULT_OPERATOR_IMAGE, DEFAULT_RUNTIME_IMAGE, OperatorSettings
from brim.runtime.cli import build_parser
from brim.runtime.server.metrics import SPECS
from tests import tools
from tests.charts.render import (ALL_FEATURES, CHART, NAMESPACE, RELEASE, ROOT, copy_chart, find,
                                 helm, kinds, render, template, values_file)
from tests.crd_schema import load_crd, validate_against_crd

THIRD_PARTY_CRDS = ROOT / "tests" / "data" / "crds"
CRD_FILE = "modeldeployments.brim.dev.yaml"
OLDEST_KUBERNETES = "1.28.0"  # Chart.yaml's kubeVersion: the CRD's CEL rules need it
NEWEST_KUBERNETES = kubernetes_validate.latest_version()
CUSTOM_RESOURCES = {  # apiVersion -> the vendored CRD its objects must fit
    "monitoring.coreos.com/v1": {
        "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    },
    "keda.sh/v1alpha1": {"ScaledObject": "keda.sh_scaledobjects.yaml"},
}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chart")


@pytest.fixture(scope="module")
def home(workdir) -> Path:
    return workdir / "helm-home"


@pytest.fixture(scope="module")
def chart(workdir) -> Path:
    return copy_chart(workdir)


@pytest.fixture(scope="module")
def all_values(workdir) -> Path:
    return values_file(ALL_FEATURES, workdir, "all-features.yaml")


@pytest.fixture(scope="module")
def rendered(chart, home, all_values) -> dict[str, tuple[str, list[dict]]]:
    """features ("default" or "all") -> (manifest text, objects)."""
    return {"default": render(chart, home), "all": render(chart, home, "--values", all_values)}


def operator_args(objects: list[dict]) -> list[str]:
    (container,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["brim"]
    return container["args"]


def parse_operator_args(args: list[str]):
    """The Namespace `brim operator` would run with: brim's own parser, no cluster needed."""
    assert args[0] == "operator", args
    return build_parser(["operator"]).parse_args(args)


# --- the chart as a package ------------------------------------------------------------------


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "brim"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == VERSION
    assert meta["kubeVersion"] == ">=1.28.0-0"


@pytest.mark.parametrize("features", ["default", "all"])
def test_helm_lint_strict(chart, home, all_values, features):
    args = ["--values", all_values] if features == "all" else []
    result = helm("lint", "--strict", chart, "--namespace", NAMESPACE, *args, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_kubernetes_older_than_1_28_is_refused(chart, home):
    old = template(chart, home, "--kube-version", "1.27.9")
    assert old.returncode != 0
    assert "chart requires kubeVersion: >=1.28.0-0" in old.stderr
    assert template(chart, home, "--kube-version", OLDEST_KUBERNETES).returncode == 0


def test_default_install_is_the_operator_and_its_rbac(rendered):
    _, objects = rendered["default"]
    assert kinds(objects) == [
        ("ClusterRole", "brim"),
        ("ClusterRoleBinding", "brim"),
        ("Deployment", "brim"),
        ("NetworkPolicy", "brim"),
        ("ServiceAccount", "brim"),
    ]


def test_every_feature_adds_its_objects(rendered, chart):
    _, objects = rendered["all"]
    dashboards = sorted(p.stem for p in (chart / "dashboards").glob("*.json"))
    assert dashboards
    assert kinds(objects) == sorted([
        ("ClusterRole", "brim"),
        ("ClusterRoleBinding", "brim"),
        ("Deployment", "brim"),
        ("NetworkPolicy", "brim"),
        ("ServiceAccount", "brim"),
        ("ServiceMonitor", "brim-runtime"),
        ("PrometheusRule", "brim"),
        ("ScaledObject", "llama-8b"),
        *(("ConfigMap", f"brim-dashboard-{name.lower().replace('_', '-')}")
          for name in dashboards),
    ])


def test_templates_are_named_component_kind(rendered):
    """Each object comes from templates/<component>-<kind>.yaml, where component is its
    app.kubernetes.io/component label."""
    text, _ = rendered["all"]
    sources = re.split(r"^---\n", text, flags=re.M)
    checked = 0
    for source in filter(str.strip, sources):
        (path,) = re.findall(r"^# Source: brim/templates/(\S+)$", source, flags=re.M)
        obj = yaml.safe_load(source)
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        assert path == f"{component}-{obj['kind'].lower()}.yaml", (path, component, obj["kind"])
        checked += 1
    assert checked == len(rendered["all"][1])


# --- validity --------------------------------------------------------------------------------


def is_custom(obj: dict) -> bool:
    return obj["apiVersion"] in CUSTOM_RESOURCES


@pytest.mark.parametrize("kubernetes", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("features", ["default", "all"])
def test_built_in_objects_are_valid_kubernetes(rendered, features, kubernetes):
    _, objects = rendered[features]
    built_in = [o for o in objects if not is_custom(o)]
    assert len(built_in) >= 5
    for obj in built_in:
        try:
            kubernetes_validate.validate(obj, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} on {kubernetes}: {exc}")


def test_custom_resources_fit_their_crds(rendered):
    _, objects = rendered["all"]
    custom = [o for o in objects if is_custom(o)]
    assert sorted(o["kind"] for o in custom) == ["PrometheusRule", "ScaledObject",
                                                 "ServiceMonitor"]
    for obj in custom:
        crd = load_crd(THIRD_PARTY_CRDS / CUSTOM_RESOURCES[obj["apiVersion"]][obj["kind"]])
        assert validate_against_crd(crd, obj) == [], obj["kind"]


def test_chart_crd_is_a_byte_identical_copy():
    copies = sorted(p.name for p in (CHART / "crds").iterdir())
    assert copies == [CRD_FILE]
    assert (CHART / "crds" / CRD_FILE).read_bytes() == (ROOT / "crds" / CRD_FILE).read_bytes()


def test_crd_installs_with_the_chart_and_is_valid(chart, home):
    _, objects = render(chart, home, "--include-crds")
    crd = find(objects, "CustomResourceDefinition")
    assert crd == yaml.safe_load((ROOT / "crds" / CRD_FILE).read_text())
    for kubernetes in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
        kubernetes_validate.validate(crd, kubernetes, strict=True)


# --- values and their schema ------------------------------------------------------------------

# (how it is set, what, the key helm must name). Every one is a mistake the schema must catch
# before anything is installed.
BAD_VALUES = [
    pytest.param("--set", "replicas=2", "additional properties 'replicas' not allowed",
                 id="unknown-top-level-key"),
    pytest.param("--set", "operator.imagee.tag=x", "at '/operator': additional properties "
                 "'imagee' not allowed", id="misspelt-nested-key"),
    pytest.param("--set", "serviceMonitor.intervall=30s", "at '/serviceMonitor': additional "
                 "properties 'intervall' not allowed", id="misspelt-monitoring-key"),
    pytest.param("--set-json", 'runtime.gpuResources={"request": {"cpu": "2"}}',
                 "at '/runtime/gpuResources': additional properties 'request' not allowed",
                 id="misspelt-resources-key"),
    pytest.param("--set-json", 'runtime.tolerations=[{"key": "pool", "operater": "Exists"}]',
                 "at '/runtime/tolerations/0': additional properties 'operater' not allowed",
                 id="misspelt-toleration-key"),
    pytest.param("--set", "operator.livenessPort=http", "at '/operator/livenessPort': got "
                 "string, want integer", id="port-not-a-number"),
    pytest.param("--set", "dashboards.enabled=yes", "at '/dashboards/enabled': got string, "
                 "want boolean", id="enabled-not-a-boolean"),
    pytest.param("--set-json", 'operator.watchNamespaces="ml"', "at '/operator/watchNamespaces':"
                 " got string, want array", id="namespaces-not-a-list"),
    pytest.param("--set", "operator.resyncSeconds=-30", "at '/operator/resyncSeconds': minimum:"
                 " got -30, want 1", id="negative-resync"),
    pytest.param("--set-json", "runtime.gpuMemoryUtilization=1.5",
                 "at '/runtime/gpuMemoryUtilization'", id="utilization-1.5"),
    pytest.param("--set", "runtime.gpuMemoryUtilization=1.5",  # --set passes "1.5"
                 "at '/runtime/gpuMemoryUtilization'", id="utilization-1.5-as-string"),
    pytest.param("--set", "runtime.gpuMemoryUtilization=0.995",
                 "at '/runtime/gpuMemoryUtilization'", id="utilization-0.995-as-string"),
    pytest.param("--set", "runtime.imagePullPolicy=Sometimes", "at '/runtime/imagePullPolicy':"
                 " value must be one of 'Always', 'IfNotPresent', 'Never'",
                 id="runtime-pull-policy"),
    pytest.param("--set", "operator.image.pullPolicy=always", "at '/operator/image/pullPolicy'"
                 ": value must be one of 'Always', 'IfNotPresent', 'Never'",
                 id="operator-pull-policy"),
    pytest.param("--set", "runtime.maxTensorParallelSize=0", "at '/runtime/maxTensorParallel"
                 "Size': minimum: got 0, want 1", id="tensor-parallel-0"),
    pytest.param("--set", "operator.logFormat=yaml", "at '/operator/logFormat'",
                 id="log-format"),
    pytest.param("--set", "keda.minReplicas=0", "at '/keda/minReplicas': minimum: got 0, want 1",
                 id="keda-min-0"),
    pytest.param("--set", "runtime.image.digest=abc", "at '/runtime/image/digest'",
                 id="digest-not-sha256"),
]


@pytest.mark.parametrize("how, setting, message", BAD_VALUES)
def test_values_schema_refuses(chart, home, how, setting, message):
    result = template(chart, home, how, setting)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("how, setting", [
    ("--set", "runtime.gpuMemoryUtilization=auto"),
    ("--set", "runtime.gpuMemoryUtilization=0.85"),
    ("--set-json", "runtime.gpuMemoryUtilization=0.5"),
    ("--set", "runtime.gpuMemoryUtilization=0.99"),
    ("--set-json", 'operator.watchNamespaces=["ml"]'),
    ("--set", "runtime.image.digest=sha256:" + "ab" * 32),
    ("--set", "keda.threshold=2.5"),
])
def test_values_schema_accepts(chart, home, how, setting):
    result = template(chart, home, how, setting)
    assert result.returncode == 0, result.stderr


def walk_schema(node: dict, path: str = ""):
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk_schema(child, f"{path}.{name}")
    for name, child in (node.get("definitions") or {}).items():
        yield from walk_schema(child, f"definitions.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk_schema(node[key], f"{path}.{key}")
    for branch in node.get("oneOf") or []:
        yield from walk_schema(branch, f"{path}.oneOf")


def test_values_schema_closes_every_object():
    """Every object in the schema names its keys (additionalProperties: false) or, for maps
    such as labels and resources, says what each value must be."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    objects = [(path, node) for path, node in walk_schema(schema) if node.get("type") == "object"]
    assert len(objects) > 15
    for path, node in objects:
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
        else:
            assert isinstance(node.get("additionalProperties"), dict), path


def test_values_yaml_fits_its_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    # And the schema has no key values.yaml does not show (with its comment).
    for path, node in walk_schema(schema):
        if path.startswith("definitions") or not path or ".items" in path or ".oneOf" in path:
            continue
        value = values
        for key in path.strip(".").split("."):
            assert isinstance(value, dict) and key in value, f"{path} is not in values.yaml"
            value = value[key]


def documented_keys(node, schema: dict, lines: list[str], path: str = ""):
    """(key path, whether a comment is right above it) for each key values.yaml sets that the
    chart defines (schema `properties`, not free-form data such as resources' contents)."""
    for key_node, value_node in node.value:
        key = key_node.value
        child = (schema.get("properties") or {}).get(key)
        if child is None:
            continue
        above = lines[key_node.start_mark.line - 1].strip() if key_node.start_mark.line else ""
        yield f"{path}.{key}".lstrip("."), above.startswith("#")
        if "$ref" not in child and isinstance(value_node, yaml.MappingNode):
            yield from documented_keys(value_node, child, lines, f"{path}.{key}")


def test_every_value_has_a_comment():
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = list(documented_keys(yaml.compose(text), schema, text.splitlines()))
    assert len(keys) > 60
    assert [key for key, commented in keys if not commented] == []


def test_default_images_are_the_operators_defaults():
    """The chart installs the images operator/settings.py names (and pyproject's version)."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for image, default in ((values["operator"]["image"], DEFAULT_OPERATOR_IMAGE),
                           (values["runtime"]["image"], DEFAULT_RUNTIME_IMAGE)):
        assert image["tag"] == "" and image["digest"] == ""  # the chart's appVersion
        assert f"{image['repository']}:{meta['appVersion']}" == default
    assert DEFAULT_OPERATOR_IMAGE.endswith(f":{VERSION}")


# --- the operator --------------------------------------------------------------------------


def test_operator_runs_with_the_operators_own_defaults(rendered):
    """With default values, `brim operator` runs exactly as with no flags at all."""
    args = parse_operator_args(operator_args(rendered["default"][1]))
    settings = OperatorSettings()
    assert args.namespace == [] and args.all_namespaces
    assert args.runtime_image == DEFAULT_RUNTIME_IMAGE == settings.runtime_image
    assert args.facts_image == DEFAULT_OPERATOR_IMAGE == settings.facts_image
    assert args.image_pull_policy == settings.image_pull_policy == "IfNotPresent"
    assert args.gpu_memory_utilization == settings.gpu_memory_utilization == 0.9
    assert args.gpu_resources == settings.gpu_resources
    assert args.cpu_resources == settings.cpu_resources
    assert args.tolerations == list(settings.tolerations) == []
    assert args.termination_grace_seconds == settings.termination_grace_seconds
    assert args.max_tensor_parallel_size == settings.max_tensor_parallel_size == 8
    assert args.resync_seconds == settings.resync_seconds
    assert args.hf_endpoint is None
    assert args.liveness_port == 8080 and args.log_format == "json" and not args.verbose


OPERATOR_VALUES = {
    "operator": {
        "image": {"repository": "registry.example.com/brim/operator", "tag": "9.9.9",
                  "digest": "", "pullPolicy": "Always"},
        "watchNamespaces": ["ml", "research"],
        "resyncSeconds": 45,
        "livenessPort": 9090,
        "logFormat": "plain",
        "verbose": True,
        "hfEndpoint": "https://hf-mirror.example.com",
    },
    "runtime": {
        "image": {"repository": "registry.example.com/brim/runtime", "tag": "",
                  "digest": "sha256:" + "0123456789abcdef" * 4},
        "imagePullPolicy": "Always",
        "gpuMemoryUtilization": 0.85,
        "gpuResources": {"requests": {"cpu": "4", "memory": "32Gi"},
                         "limits": {"memory": "48Gi"}},
        "cpuResources": {"requests": {"cpu": 2, "memory": "4Gi"}},
        "tolerations": [{"key": "pool", "operator": "Equal", "value": "llm",
                         "effect": "NoSchedule"}],
        "maxTensorParallelSize": 4,
        "terminationGraceSeconds": 120,
    },
}


def test_operator_flags_carry_every_value(chart, home, workdir):
    _, objects = render(chart, home, "--values", values_file(OPERATOR_VALUES, workdir, "op.yaml"))
    args = parse_operator_args(operator_args(objects))
    operator, runtime = OPERATOR_VALUES["operator"], OPERATOR_VALUES["runtime"]
    assert args.namespace == ["ml", "research"] and not args.all_namespaces
    assert args.runtime_image == f"registry.example.com/brim/runtime@{runtime['image']['digest']}"
    assert args.facts_image == "registry.example.com/brim/operator:9.9.9"  # the operator's
    assert args.image_pull_policy == "Always"
    assert args.gpu_memory_utilization == 0.85
    assert args.gpu_resources == runtime["gpuResources"]
    assert args.cpu_resources == runtime["cpuResources"]
    assert args.tolerations == runtime["tolerations"]
    assert args.termination_grace_seconds == 120
    assert args.max_tensor_parallel_size == 4
    assert args.resync_seconds == 45
    assert args.hf_endpoint == operator["hfEndpoint"]
    assert args.liveness_port == 9090 and args.log_format == "plain" and args.verbose

    deployment = find(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/brim/operator:9.9.9"
    assert container["imagePullPolicy"] == "Always"
    assert container["ports"] == [{"name": "healthz", "containerPort": 9090, "protocol": "TCP"}]
    policy = find(objects, "NetworkPolicy")
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9090}]}]


@pytest.mark.parametrize("how, setting, attribute, expected", [
    ("--set", "runtime.gpuMemoryUtilization=auto", "gpu_memory_utilization", "auto"),
    ("--set", "runtime.gpuMemoryUtilization=0.85", "gpu_memory_utilization", 0.85),
    ("--set", "runtime.factsImage=registry.example.com/facts:1", "facts_image",
     "registry.example.com/facts:1"),
])
def test_operator_flag_from_a_set_value(chart, home, how, setting, attribute, expected):
    _, objects = render(chart, home, how, setting)
    assert getattr(parse_operator_args(operator_args(objects)), attribute) == expected


def test_chart_sets_every_operator_flag(rendered):
    """A new `brim operator` flag needs a chart value (or a reason to be left out here)."""
    (operator_parser,) = (
        choice for action in build_parser(["operator"])._subparsers._group_actions
        for name, choice in action.choices.items() if name == "operator")
    flags = {max(action.option_strings, key=len) for action in operator_parser._actions
             if action.option_strings}
    not_set_by_default = {"--help", "--verbose", "--namespace", "--hf-endpoint"}
    used = {arg.split("=")[0] for arg in operator_args(rendered["default"][1])[1:]}
    assert flags - not_set_by_default == used
    used_all = {arg.split("=")[0] for arg in operator_args(rendered["all"][1])[1:]}
    assert {"--namespace", "--hf-endpoint"} <= used_all


def test_operator_deployment_is_hardened(rendered):
    deployment = find(rendered["default"][1], "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == find(rendered["default"][1], "ServiceAccount")[
        "metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    uid = OperatorSettings().run_as_user
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                                      "fsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    probe = {"httpGet": {"path": "/healthz", "port": "healthz"}}
    assert container["livenessProbe"].items() >= probe.items()
    assert container["readinessProbe"].items() >= probe.items()
    assert container["ports"] == [{"name": "healthz", "containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "512Mi"}}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    # The NetworkPolicy selects this pod.
    policy = find(rendered["default"][1], "NetworkPolicy")
    pod_labels = spec["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["selector"]["matchLabels"] == policy["spec"]["podSelector"]["matchLabels"]


# The operator's API calls, as tests/operator/test_rbac.py records them: (group, resources,
# verbs), in the template's order.
CLUSTER_ROLE_RULES = [
    ("brim.dev", "modeldeployments", "get list watch patch"),
    ("brim.dev", "modeldeployments/status", "patch"),
    ("apps", "deployments", "get list watch create patch"),
    ("", "services", "get list watch create patch"),
    ("policy", "poddisruptionbudgets", "get list watch create patch delete"),
    ("batch", "jobs", "get list watch create delete"),
    ("", "pods", "list watch"),
    ("", "pods/log", "get"),
    ("", "nodes", "list"),
    ("", "secrets", "get"),
    ("", "events", "create"),
    ("monitoring.coreos.com", "servicemonitors", "get create patch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list watch"),
]
# Only with operator.watchNamespaces: kopf observes namespaces when it watches named ones.
NAMESPACES_RULE = ("", "namespaces", "list watch")


@pytest.mark.parametrize("features, expected", [
    ("default", CLUSTER_ROLE_RULES),
    ("all", [*CLUSTER_ROLE_RULES, NAMESPACES_RULE]),  # watchNamespaces: [ml, research]
])
def test_cluster_role_is_exactly_the_operators_calls(rendered, features, expected):
    role = find(rendered[features][1], "ClusterRole")
    rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]
    assert rules == [([g], [r], v.split()) for g, r, v in expected]
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    binding = find(rendered["default"][1], "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "brim",
                                    "namespace": NAMESPACE}]


def rule_comments(template: str) -> dict[str, str]:
    """The comment right above each rule of the ClusterRole template, by its resources."""
    comments, block = {}, []
    for line in template.splitlines():
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("# "))
        elif text.startswith("- apiGroups:"):
            comments[text] = " ".join(block)
        elif text.startswith("resources:"):
            comments[text.split(":", 1)[1].strip()] = comments.pop(next(reversed(comments)))
        if not text.startswith("#"):
            block = []
    return comments


def test_each_rule_says_why():
    comments = rule_comments((CHART / "templates" / "operator-clusterrole.yaml").read_text())
    assert len(comments) == len(CLUSTER_ROLE_RULES) + 1
    assert [rule for rule, why in comments.items() if not why] == []
    # Secrets are the one read a reviewer asks about: the comment says which and why.
    assert "spec.model.tokenSecretRef" in comments['["secrets"]']


# --- monitoring and autoscaling ---------------------------------------------------------------


def test_service_monitor_selects_the_runtime_services_the_operator_makes(rendered):
    monitor = find(rendered["all"][1], "ServiceMonitor")
    md = {"metadata": {"name": "llama-8b", "namespace": "ml", "uid": "1"}}
    service = children.build_service(md, OperatorSettings())
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/component": "runtime",
                        "app.kubernetes.io/managed-by": "brim-operator"}
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    # It never selects what the chart itself installs.
    for obj in rendered["all"][1]:
        assert not selector.items() <= obj["metadata"]["labels"].items(), obj["kind"]


def test_prometheus_rule_carries_the_rules_file(rendered, chart):
    rule = find(rendered["all"][1], "PrometheusRule")
    rules_file = yaml.safe_load((chart / "rules" / "brim-rules.yaml").read_text())
    assert rule["spec"] == {"groups": rules_file["groups"]}
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_without_its_rules_file_fails(chart, home, workdir):
    broken = copy_chart(workdir / "no-rules")
    (broken / "rules" / "brim-rules.yaml").unlink()
    result = template(broken, home, "--set", "prometheusRule.enabled=true")
    assert result.returncode != 0
    assert "rules/brim-rules.yaml is missing or empty" in result.stderr


def test_dashboards_are_config_maps_for_the_grafana_sidecar(rendered, chart):
    maps = [o for o in rendered["all"][1] if o["kind"] == "ConfigMap"]
    files = sorted((chart / "dashboards").glob("*.json"))
    assert len(maps) == len(files) >= 1
    for path, config_map in zip(files, sorted(maps, key=lambda m: m["metadata"]["name"])):
        assert config_map["data"] == {path.name: path.read_text()}
        json.loads(config_map["data"][path.name])
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLMs"}


def test_dashboard_label_and_folder_annotation_are_configurable(chart, home):
    _, objects = render(chart, home, "--set", "dashboards.enabled=true,dashboards.label=dash,"
                        "dashboards.labelValue=brim,dashboards.folderAnnotation=k8s-folder")
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert config_map["metadata"]["labels"]["dash"] == "brim"
        assert "grafana_dashboard" not in config_map["metadata"]["labels"]
        assert config_map["metadata"]["annotations"] == {"k8s-folder": "brim"}


def test_keda_scales_the_model_deployment_on_queue_depth(rendered):
    scaled = find(rendered["all"][1], "ScaledObject")
    assert scaled["metadata"]["namespace"] == "ml"  # beside its ModelDeployment
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment", "name": "llama-8b"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 3)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus.monitoring.svc:9090",
        "query": 'sum(brim_num_requests_waiting{namespace="ml", model_name="llama-8b"})',
        "threshold": "6",
    }
    # The metric and its label are the runtime's; the target has a scale subresource.
    waiting = next(spec for spec in SPECS if spec.key == "waiting")
    assert waiting.name == "brim_num_requests_waiting" and waiting.labels == ()
    crd = load_crd(ROOT / "crds" / CRD_FILE)
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_keda_served_model_name(chart, home):
    _, objects = render(chart, home, "--set", "keda.enabled=true,keda.name=chat,"
                        "keda.servedModelName=llama-3.1-8b")
    (trigger,) = find(objects, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["query"] == (
        f'sum(brim_num_requests_waiting{{namespace="{NAMESPACE}", model_name="llama-3.1-8b"}})')


@pytest.mark.parametrize("setting, message", [
    ("keda.enabled=true", "keda.name: the ModelDeployment to scale is required"),
    ("keda.enabled=true,keda.name=x,keda.minReplicas=5,keda.maxReplicas=2",
     "keda.minReplicas (5) is more than keda.maxReplicas (2)"),
])
def test_keda_example_refuses_an_incomplete_setup(chart, home, setting, message):
    result = template(chart, home, "--set", setting)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --- what the user reads ----------------------------------------------------------------------


def install_notes(chart: Path, home: Path, *args: str) -> str:
    result = helm("install", RELEASE, chart, "--namespace", NAMESPACE, "--dry-run=client",
                  *args, home=home)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:\n", 1)[1]


def test_notes_show_a_first_model_deployment_and_its_plan(chart, home):
    notes = install_notes(chart, home)
    assert "kubectl get md -n default" in notes
    assert "kubectl describe md smollm2 -n default" in notes
    manifest = re.search(r"<<'EOF'\n(.*?)\n\s*EOF", notes, re.S).group(1)
    md = yaml.safe_load(manifest)
    assert md["kind"] == "ModelDeployment" and md["spec"]["model"]["uri"] == "bundled"
    crd = load_crd(ROOT / "crds" / CRD_FILE)
    assert validate_against_crd(crd, md) == []
    assert "kubectl apply --server-side -f charts/brim/crds/" in notes
    assert "every namespace" in notes


def test_notes_use_a_watched_namespace(chart, home):
    notes = install_notes(chart, home, "--set", "operator.watchNamespaces={ml,research}")
    assert "reconciles ModelDeployments in ml, research." in notes
    assert "kubectl get md -n ml" in notes


def test_readmes_tell_the_crd_upgrade_and_monitoring():
    readme = (CHART / "README.md").read_text()
    assert "kubectl apply --server-side -f charts/brim/crds/" in readme
    for value in ("serviceMonitor.enabled", "prometheusRule.enabled", "dashboards.enabled",
                  "keda.enabled", "values.yaml"):
        assert value in readme, value
    assert "brim/README.md" in (ROOT / "charts" / "README.md").read_text()


# --- checkov ---------------------------------------------------------------------------------

# Each check the chart skips (a checkov.io/skip annotation on the object) and why; a new skip
# must be added here with its reason, and one that is no longer needed fails too.
SKIPPED_CHECKS = {
    "CKV_K8S_15": "IfNotPresent",  # image pull policy: release tags never move
    "CKV_K8S_38": "service account token",  # the operator calls the API
    "CKV_K8S_43": "digest",  # images by tag until a digest exists; operator.image.digest
}


def test_checkov_finds_nothing_in_the_rendered_chart(rendered, workdir):
    scan = workdir / "checkov"
    scan.mkdir()
    for features, (text, _) in rendered.items():
        (scan / f"{features}.yaml").write_text(text)
    report = tools.checkov_scan("kubernetes", scan, cwd=workdir)
    failed = [(c["check_id"], c["check_name"], c["file_path"], c["resource"])
              for c in report["results"]["failed_checks"]]
    assert failed == []
    assert report["summary"]["passed"] > 150
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} == set(SKIPPED_CHECKS)
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert SKIPPED_CHECKS[check["check_id"]] in reason, check["check_id"]
        assert check["resource"] == f"Deployment.{NAMESPACE}.brim"
