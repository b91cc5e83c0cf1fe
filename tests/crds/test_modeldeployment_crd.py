"""crds/modeldeployments.brim.dev.yaml: a valid CRD that accepts the examples and refuses
the mistakes users make, with messages that name the field."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from brim.runtime.planner.lengths import parse_token_count
from tests.crds.cel import check_rules, compile_rule, format_path, to_cel
from tests.crds.validate import (CRD_PATH, apply_defaults, load_crd, openapi_schema,
                                 to_jsonschema, validate_model_deployment)

REPO = CRD_PATH.parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
KUBECTL = shutil.which("kubectl")

CRD = load_crd()
SCHEMA = openapi_schema()
VERSION = CRD["spec"]["versions"][0]

# The only nodes that keep fields the schema does not name, and why.
PRESERVE_UNKNOWN = {
    ("spec", "model", "config"),  # an inline config.json: any keys
    ("spec", "engine", "gpuMemoryUtilization"),  # "auto" or a number: no structural type for it
}


def walk(schema: dict, path: tuple = ()):
    """(path, node) for the root and every property, map value and list item below it."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, path + (name,))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], path + ("*",))
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], path + ("[]",))


def node_at(path: tuple) -> dict | None:
    node = SCHEMA
    for name in path:
        if name == "[]":
            node = node.get("items")
        elif name in node.get("properties", {}):
            node = node["properties"][name]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
        if node is None:
            return None
    return node


def jsonpath_to_path(jsonpath: str) -> tuple:
    assert re.fullmatch(r"(\.[A-Za-z_][A-Za-z0-9_]*)+", jsonpath), jsonpath
    return tuple(jsonpath.strip(".").split("."))


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / name).read_text())


DELETE = object()  # with_spec(..., field=DELETE) removes the field


def with_spec(base: dict, **changes) -> dict:
    """base with spec fields set from dotted names: with_spec(obj, **{"engine.dtype": "x"})."""
    obj = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = obj["spec"]
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


# --- the CRD itself ----------------------------------------------------------------------------


def test_names_and_version():
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["kind"] == "CustomResourceDefinition"
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["group"] == "brim.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "ModelDeployment", "listKind": "ModelDeploymentList",
                             "plural": "modeldeployments", "singular": "modeldeployment",
                             "shortNames": ["md"], "categories": ["brim"]}
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == \
        [("v1alpha1", True, True)]


@pytest.mark.parametrize("kubernetes", ["1.28.0", "1.37.0"])
def test_is_a_crd_the_apiserver_decodes(kubernetes):
    """Every key is one apiextensions.k8s.io/v1 knows (down to the nested schema), from
    Kubernetes 1.28, the first with the rules' fieldPath and reason."""
    import kubernetes_validate

    kubernetes_validate.validate(CRD, kubernetes, strict=True)


def test_schema_is_structural():
    for path, node in walk(SCHEMA):
        where = format_path(list(path)) or "<root>"
        untyped_ok = node.get("x-kubernetes-int-or-string") or \
            node.get("x-kubernetes-preserve-unknown-fields")
        assert node.get("type") or untyped_ok, f"{where} has no type"
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{where}: an array needs items"
        assert not ("properties" in node and "additionalProperties" in node), \
            f"{where}: properties and additionalProperties together"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path in PRESERVE_UNKNOWN, f"{where} keeps unknown fields unintentionally"
        if node.get("x-kubernetes-int-or-string"):
            assert not node.get("type") and not node.get("x-kubernetes-preserve-unknown-fields")
            assert node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) == \
                [{"type": "integer"}, {"type": "string"}], where
        else:
            assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, where
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []) or "default" in item["properties"][key]
    # The apiserver allows only restrictions on name and generateName in metadata.
    metadata = SCHEMA["properties"]["metadata"]
    assert set(metadata) <= {"type", "properties"} and metadata["type"] == "object"
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}
    assert not any(k in SCHEMA["properties"]["metadata"] for k in ("default", "description"))


def test_every_field_is_described_for_kubectl_explain():
    undescribed = [format_path(list(path)) or "<root>" for path, node in walk(SCHEMA)
                   if path != ("metadata",) and not str(node.get("description", "")).strip()]
    assert undescribed == []


def test_defaults_are_valid_values_of_their_fields():
    for path, node in walk(SCHEMA):
        if "default" in node:
            validator = jsonschema.Draft4Validator(to_jsonschema(node))
            assert list(validator.iter_errors(node["default"])) == [], format_path(list(path))


def test_printer_columns_point_at_fields_of_their_type():
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert [name.upper() for name in columns] == \
        ["MODEL", "GPU", "TP", "MAX-LEN", "KV-TOKENS", "READY", "STATUS", "AGE"]
    for name, column in columns.items():
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        node = node_at(jsonpath_to_path(column["jsonPath"]))
        assert node is not None, f"{name}: {column['jsonPath']} is not in the schema"
        assert node["type"] == column["type"], name


def test_status_and_scale_subresources():
    subresources = VERSION["subresources"]
    assert subresources["status"] == {}
    scale = subresources["scale"]
    assert node_at(jsonpath_to_path(scale["specReplicasPath"]))["type"] == "integer"
    assert node_at(jsonpath_to_path(scale["statusReplicasPath"]))["type"] == "integer"
    assert node_at(jsonpath_to_path(scale["labelSelectorPath"]))["type"] == "string"
    assert scale["specReplicasPath"] == ".spec.replicas"


def rules():
    for path, node in walk(SCHEMA):
        for rule in node.get("x-kubernetes-validations", ()):
            yield path, node, rule


def test_cel_rules_compile_and_name_their_fields():
    assert len(list(rules())) >= 10
    for path, _, rule in rules():
        compile_rule(rule["rule"])  # raises on a syntax error
        assert re.search(r"\b(spec|metadata)\.[a-z]", rule["message"]), rule["message"]
        assert rule.get("reason", "FieldValueInvalid") in (
            "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired",
            "FieldValueDuplicate")
        if "fieldPath" in rule:
            target = path + tuple(jsonpath_to_path(rule["fieldPath"]))
            assert node_at(target) is not None or target == ("metadata", "name"), target


CEL_METHODS = {"startsWith", "endsWith", "matches", "substring", "contains", "size", "all",
               "exists"}


def test_cel_rules_read_only_bounded_values():
    """The apiserver refuses rules whose estimated cost is too high; a string, list or map
    without maxLength, maxItems or maxProperties counts as the size of a whole request."""
    for path, _, rule in rules():
        for read in re.findall(r"self((?:\.[A-Za-z_]+)*)", rule["rule"]):
            names = tuple(n for n in read.split(".")[1:] if n not in CEL_METHODS)
            node = node_at(path + names)
            where = format_path(list(path + names)) or "<root>"
            if node.get("type") == "array":  # read item by item (all, exists)
                assert "maxItems" in node, where
                node = node["items"]
            if node.get("type") == "object" and "additionalProperties" in node:
                assert "maxProperties" in node, where  # only `in` reads maps here
            if node.get("type") == "string" or node.get("x-kubernetes-int-or-string"):
                assert "maxLength" in node or "enum" in node, where


# --- defaults and examples ---------------------------------------------------------------------


def test_defaults_fill_a_minimal_spec():
    obj = {"apiVersion": "brim.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": "m"},
           "spec": {"model": {"uri": "hf://org/name", "tokenSecretRef": {"name": "hf"}},
                    "gpu": {}, "apiKeySecretRef": {"name": "k"}}}
    assert apply_defaults(obj)["spec"] == {
        "model": {"uri": "hf://org/name", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "replicas": 1,
        "device": "gpu",
        "gpu": {"count": "auto"},
        "engine": {"maxModelLen": "auto", "dtype": "auto",
                   "kvCacheDtype": "auto", "enablePrefixCaching": True, "blockSize": 16},
        "apiKeySecretRef": {"name": "k", "key": "api-key"},
    }
    assert obj["spec"]["gpu"] == {}, "apply_defaults must not change its argument"
    assert validate_model_deployment(obj) == []


def test_defaults_keep_given_values_and_replace_disallowed_nulls():
    obj = example("llama-3.1-8b.yaml")
    obj["spec"]["engine"]["blockSize"] = None  # null where null is not allowed: defaulted
    obj["spec"]["priorityClassName"] = None  # ... and without a default: dropped
    spec = apply_defaults(obj)["spec"]
    assert spec["replicas"] == 2 and spec["engine"]["gpuMemoryUtilization"] == "auto"
    assert spec["engine"]["blockSize"] == 16 and "priorityClassName" not in spec


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    obj = yaml.safe_load(path.read_text())
    assert validate_model_deployment(obj) == []
    assert validate_model_deployment(apply_defaults(obj), defaults=False) == []


def test_examples_are_the_three_promised():
    assert [p.name for p in EXAMPLES] == ["bundled.yaml", "llama-3.1-8b.yaml", "pvc-model.yaml"]
    readme = (REPO / "examples" / "README.md").read_text()
    assert all(p.name in readme for p in EXAMPLES)
    bundled = apply_defaults(example("bundled.yaml"))["spec"]
    assert bundled["device"] == "cpu" and bundled["replicas"] == 1 and "gpu" not in bundled
    llama = apply_defaults(example("llama-3.1-8b.yaml"))["spec"]
    assert llama["model"]["tokenSecretRef"] == {"name": "hf-token", "key": "token"}
    assert llama["gpu"] == {"products": ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"], "count": "auto"}
    assert (llama["replicas"], llama["device"], llama["engine"]["maxModelLen"],
            llama["engine"]["minModelLen"]) == (2, "gpu", "auto", "16k")
    pvc = apply_defaults(example("pvc-model.yaml"))["spec"]
    assert pvc["model"]["uri"].startswith("pvc://") and pvc["engine"]["maxModelLen"] == "32k"
    assert pvc["apiKeySecretRef"]["key"] == "api-key"
    assert (pvc["engine"]["blockSize"], pvc["engine"]["enablePrefixCaching"]) == (16, True)


# --- what is accepted and what is refused ------------------------------------------------------

BASE = example("llama-3.1-8b.yaml")
CPU = example("bundled.yaml")


@pytest.mark.parametrize("changes", [
    {"engine.maxModelLen": 8192, "engine.minModelLen": DELETE},
    {"engine.maxModelLen": "8192", "engine.minModelLen": "8k"},
    {"engine.maxModelLen": "32K", "engine.minModelLen": "32k"},
    {"engine.maxModelLen": "25.6k", "engine.minModelLen": 25600},
    {"engine.maxModelLen": "8.192k", "engine.minModelLen": "8192"},
    {"engine.maxModelLen": "1M", "engine.minModelLen": "1000k"},
    {"engine.maxModelLen": "auto", "engine.minModelLen": "1g"},
    {"engine.gpuMemoryUtilization": 0.5},
    {"engine.gpuMemoryUtilization": 0.99},
    {"engine.maxNumBatchedTokens": "16k", "engine.maxNumSeqs": 64},
    {"engine.kvCacheDtype": "fp8_e4m3", "engine.dtype": "float16"},
    {"engine.kvCacheDtype": "fp8", "engine.quantization": "fp8"},
    {"engine.quantization": "gptq"},
    {"engine.extraArgs": ["--max-queue-len", "512", "--seed=1"]},
    {"gpu.count": 8},
    {"gpu.count": 1, "gpu.memory": "24Gi", "gpu.products": DELETE},
    {"model.uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "model.revision": "main",
     "model.tokenSecretRef": DELETE},
    {"model.uri": "pvc://models/llama/3.1-8b", "model.tokenSecretRef": DELETE},
    {"model.uri": "bundled", "model.tokenSecretRef": DELETE},
    {"model.config": {"num_hidden_layers": 32, "rope_scaling": {"factor": 8.0}},
     "model.weightsBytes": "15Gi"},
    {"model.weightsBytes": 16060522496},
    {"replicas": 0},
    {"resources": {"requests": {"cpu": "500m", "memory": "16Gi"}, "limits": {"memory": 2**34}}},
    {"nodeSelector": {"topology.kubernetes.io/zone": "us-east-1a"}},
    {"priorityClassName": "serving", "image": "ghcr.io/example/brim-runtime:0.1.0"},
])
def test_accepted(changes):
    assert validate_model_deployment(with_spec(BASE, **changes)) == []


def test_cpu_deployment_may_give_memory_as_a_limit():
    obj = with_spec(CPU, resources={"limits": {"memory": "4Gi"}})
    assert validate_model_deployment(obj) == []


NO_TOKEN = {"model.tokenSecretRef": DELETE}  # alone, the URI must be the only thing wrong

REFUSED = [
    # (what is wrong, changes to the valid llama example, the field the error must name)
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("replicas as text", {"replicas": "two"}, "spec.replicas"),
    ("misspelt spec field", {"replica": 2}, 'unknown field "spec.replica"'),
    ("misspelt engine field", {"engine.maxModelLength": 8192},
     'unknown field "spec.engine.maxModelLength"'),
    ("utilization above 0.99", {"engine.gpuMemoryUtilization": 1.5},
     "spec.engine.gpuMemoryUtilization"),
    ("utilization below 0.5", {"engine.gpuMemoryUtilization": 0.3},
     "spec.engine.gpuMemoryUtilization"),
    ("utilization as a word", {"engine.gpuMemoryUtilization": "most"},
     "spec.engine.gpuMemoryUtilization"),
    ("minModelLen 64k above 8192", {"engine.minModelLen": "64k", "engine.maxModelLen": 8192},
     "spec.engine.minModelLen"),
    ("minModelLen above maxModelLen, integers",
     {"engine.minModelLen": 8193, "engine.maxModelLen": 8192}, "spec.engine.minModelLen"),
    ("16K is 16384, above 16k", {"engine.minModelLen": "16K", "engine.maxModelLen": "16k"},
     "spec.engine.minModelLen"),
    ("1 token above 25.6k", {"engine.minModelLen": 25601, "engine.maxModelLen": "25.6k"},
     "spec.engine.minModelLen"),
    ("minModelLen auto", {"engine.minModelLen": "auto"}, "spec.engine.minModelLen"),
    ("maxModelLen 32x", {"engine.maxModelLen": "32x"}, "spec.engine.maxModelLen"),
    ("maxModelLen 0", {"engine.maxModelLen": 0}, "spec.engine.maxModelLen"),
    ("maxModelLen 0k", {"engine.maxModelLen": "0k"}, "spec.engine.maxModelLen"),
    ("maxModelLen with two suffixes", {"engine.maxModelLen": "32kk"},
     "spec.engine.maxModelLen"),
    ("maxNumBatchedTokens negative", {"engine.maxNumBatchedTokens": "-8k"},
     "spec.engine.maxNumBatchedTokens"),
    ("maxNumSeqs 0", {"engine.maxNumSeqs": 0}, "spec.engine.maxNumSeqs"),
    ("s3 URI", {"model.uri": "s3://bucket/llama", **NO_TOKEN}, "spec.model.uri"),
    ("hf URI without org", {"model.uri": "hf://gpt2", **NO_TOKEN}, "spec.model.uri"),
    ("pvc claim in upper case", {"model.uri": "pvc://Models/llama", **NO_TOKEN}, "spec.model.uri"),
    ("pvc URI without a path", {"model.uri": "pvc://models", **NO_TOKEN}, "spec.model.uri"),
    ("pvc path climbing out", {"model.uri": "pvc://models/../etc", **NO_TOKEN}, "spec.model.uri"),
    ("no URI", {"model.uri": DELETE}, "spec.model.uri"),
    ("revision with pvc", {"model.uri": "pvc://models/llama", "model.revision": "main",
                           "model.tokenSecretRef": DELETE}, "spec.model.revision"),
    ("token with bundled", {"model.uri": "bundled"}, "spec.model.tokenSecretRef"),
    ("secret key with a space", {"model.tokenSecretRef": {"name": "hf", "key": "a b"}},
     "spec.model.tokenSecretRef.key"),
    ("negative weightsBytes", {"model.weightsBytes": -1}, "spec.model.weightsBytes"),
    ("weightsBytes in furlongs", {"model.weightsBytes": "16 GB"}, "spec.model.weightsBytes"),
    ("GPUs in requests", {"resources": {"requests": {"nvidia.com/gpu": 1}}},
     "spec.resources.requests"),
    ("GPUs in limits", {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
     "spec.resources.limits"),
    ("bad quantity", {"resources": {"requests": {"memory": "lots"}}},
     "spec.resources.requests.memory"),
    ("count 0", {"gpu.count": 0}, "spec.gpu.count"),
    ("count 9", {"gpu.count": 9}, "spec.gpu.count"),
    ("count many", {"gpu.count": "many"}, "spec.gpu.count"),
    ("count as text", {"gpu.count": "2"}, "spec.gpu.count"),
    ("count 1.5", {"gpu.count": 1.5}, "spec.gpu.count"),
    ("product with a space", {"gpu.products": ["NVIDIA L4"]}, "spec.gpu.products[0]"),
    ("GPU memory without a unit", {"gpu.memory": "24"}, "spec.gpu.memory"),
    ("dtype int4", {"engine.dtype": "int4"}, "spec.engine.dtype"),
    ("kvCacheDtype int8", {"engine.kvCacheDtype": "int8"}, "spec.engine.kvCacheDtype"),
    ("quantization int4", {"engine.quantization": "int4"}, "spec.engine.quantization"),
    ("quantization in extraArgs", {"engine.extraArgs": ["--quantization=fp8"]},
     "spec.engine.extraArgs"),
    ("blockSize 12", {"engine.blockSize": 12}, "spec.engine.blockSize"),
    ("prefix caching as text", {"engine.enablePrefixCaching": "yes"},
     "spec.engine.enablePrefixCaching"),
    ("max-model-len in extraArgs", {"engine.extraArgs": ["--max-model-len", "9000"]},
     "spec.engine.extraArgs"),
    ("tensor parallel in extraArgs", {"engine.extraArgs": ["-tp=2"]}, "spec.engine.extraArgs"),
    ("port in extraArgs", {"engine.extraArgs": ["--port=9000"]}, "spec.engine.extraArgs"),
    ("device tpu", {"device": "tpu"}, "spec.device"),
    ("cpu with a GPU spec", {"device": "cpu", "resources": {"requests": {"memory": "8Gi"}}},
     "spec.gpu"),
    ("cpu without memory", {"device": "cpu", "gpu": DELETE,
                            "resources": {"requests": {"cpu": "2"}}}, "spec.resources"),
    ("toleration operator", {"tolerations": [{"key": "a", "operator": "Maybe"}]},
     "spec.tolerations[0].operator"),
    ("node selector value not text", {"nodeSelector": {"pool": 1}}, "spec.nodeSelector.pool"),
    ("api key Secret without name", {"apiKeySecretRef": {"key": "k"}},
     "spec.apiKeySecretRef.name"),
]


@pytest.mark.parametrize("changes, field", [(c, f) for _, c, f in REFUSED],
                         ids=[what for what, _, _ in REFUSED])
def test_refused_with_the_field_named(changes, field):
    errors = validate_model_deployment(with_spec(BASE, **changes))
    assert any(names(e, field) for e in errors), errors


def names(error: str, field: str) -> bool:
    """Whether an error is about this field: it leads with its path, or is exactly `field`."""
    return error == field or error.split(": ")[0] == field


def test_cel_messages_say_what_to_do():
    errors = validate_model_deployment(with_spec(
        BASE, **{"engine.minModelLen": "64k", "engine.maxModelLen": 8192}))
    assert errors == ["spec.engine.minModelLen: Invalid value: spec.engine.minModelLen must not "
                      "exceed spec.engine.maxModelLen; lower minModelLen, raise maxModelLen, or "
                      "set maxModelLen to auto"]
    errors = validate_model_deployment(with_spec(BASE, resources={"limits": {"nvidia.com/gpu": 1}}))
    assert errors == ["spec.resources.limits: Forbidden: spec.resources.limits must not set "
                      "nvidia.com/gpu: brim requests the planned number of GPUs itself; use "
                      "spec.gpu.count"]


def test_wrong_types_stop_the_cel_rules_as_in_the_apiserver():
    errors = validate_model_deployment(with_spec(
        BASE, replicas="two", **{"engine.minModelLen": "64k", "engine.maxModelLen": 8192}))
    assert errors[0] == 'spec.replicas: Invalid value: "two": must be of type integer'
    assert "some validation rules were not checked" in errors[-1]
    assert not any("minModelLen must not exceed" in e for e in errors)


@pytest.mark.parametrize("name", ["Llama_8B", "8b-llama", "llama-", "m" * 64])
def test_name_must_be_a_dns_1035_label(name):
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    errors = validate_model_deployment(obj)
    assert any(names(e, "metadata.name") for e in errors), errors
    if len(name) <= 63:
        assert errors == [
            "metadata.name: Invalid value: metadata.name must be a DNS-1035 label (at most 63 "
            "lower-case letters, digits and '-', starting with a letter): it also names the "
            "model's Service"]


@pytest.mark.parametrize("count", ["1", "8k", "8K", "25.6k", "1.5K", "0.5k", "2m", "1M", "1g",
                                   "1G", "4096"])
def test_cel_reads_token_counts_as_the_runtime_does(count):
    """minModelLen = the runtime's reading of a count is accepted against it; one more is not."""
    tokens = parse_token_count(count)
    fits = with_spec(BASE, **{"engine.maxModelLen": count, "engine.minModelLen": tokens})
    over = with_spec(BASE, **{"engine.maxModelLen": count, "engine.minModelLen": tokens + 1})
    under = with_spec(BASE, **{"engine.maxModelLen": tokens, "engine.minModelLen": count})
    assert validate_model_deployment(fits) == []
    assert validate_model_deployment(under) == []
    assert validate_model_deployment(over) != []


# --- status, as the operator writes it ---------------------------------------------------------

STATUS = {
    "observedGeneration": 3,
    "phase": "Available",
    "ready": "2/2",
    "replicas": 2,
    "readyReplicas": 2,
    "selector": "app.kubernetes.io/name=brim,app.kubernetes.io/instance=llama-8b",
    "endpoint": "http://llama-8b.default.svc:8000/v1",
    "lastGoodPlanGeneration": 3,
    "conditions": [
        {"type": "Planned", "status": "True", "reason": "Fits", "observedGeneration": 3,
         "lastTransitionTime": "2026-11-28T12:00:00Z",
         "message": "NVIDIA-L4 x1: 61440 tokens of KV cache, max_model_len 61440"},
        {"type": "Available", "status": "True", "reason": "AllReplicasReady",
         "observedGeneration": 3, "lastTransitionTime": "2026-11-28T12:03:10Z", "message": ""},
        {"type": "Progressing", "status": "False", "reason": "RolledOut",
         "observedGeneration": 3, "lastTransitionTime": "2026-11-28T12:03:10Z", "message": ""},
        {"type": "Degraded", "status": "False", "reason": "AsPlanned", "observedGeneration": 3,
         "lastTransitionTime": "2026-11-28T12:03:10.5+00:00",
         "message": "measured 3840 blocks, planned 3867 (+0.7%)"},
    ],
    "plan": {
        "fits": True, "device": "gpu", "gpuProduct": "NVIDIA-L4",
        "gpuMemoryBytes": 24152899584, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "tensorParallelSize": 1, "maxModelLen": 61440, "derivedMaxModelLen": 131072,
        "gpuMemoryUtilization": 0.95, "dtype": "bfloat16", "kvCacheDtype": "bfloat16",
        "blockSize": 16, "maxNumSeqs": 256, "maxNumBatchedTokens": 8192, "minConcurrency": 1,
        "weightsBytes": 16060522496, "weightsSource": "safetensors",
        "nonTorchBytes": 1375731712, "activationBytes": 1210056704, "cudaGraphBytes": 0,
        "nonKvBytes": 18646310912, "kvCacheBytes": 4298113024, "kvBytesPerToken": 131072,
        "numGpuBlocks": 3840, "kvCacheTokens": 61440, "maxConcurrency": 1,
        "messages": ["max_model_len auto: 61440, the most the KV cache holds"],
        "alternatives": [
            {"gpuProduct": "NVIDIA-L4", "gpuMemoryBytes": 24152899584, "tensorParallelSize": 1,
             "fits": True, "maxModelLen": 61440, "maxConcurrency": 1, "reason": "chosen"},
            {"gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuMemoryBytes": 85520809984,
             "tensorParallelSize": 1, "fits": True, "maxModelLen": 131072,
             "maxConcurrency": 4, "reason": "fits, but NVIDIA-L4 comes first in spec.gpu.products"},
            {"gpuProduct": "Tesla-T4", "gpuMemoryBytes": 16106127360, "tensorParallelSize": 1,
             "fits": False, "maxModelLen": 0, "maxConcurrency": 0,
             "reason": "not in spec.gpu.products"},
        ],
    },
    "measured": {"numGpuBlocks": 3840, "nonKvBytes": 18700000000, "weightsBytes": 16060522496,
                 "errorPercent": 0.7, "pod": "llama-8b-7d9c5b6f4-abcde",
                 "observedAt": "2026-11-28T12:03:00Z", "source": "http"},
}


def with_status(**changes) -> dict:
    obj = copy.deepcopy(BASE)
    obj["status"] = copy.deepcopy(STATUS)
    for dotted, value in changes.items():
        node = obj["status"]
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[int(name)] if isinstance(node, list) else node[name]
        node[leaf] = value
    return obj


def test_status_as_the_operator_writes_it_validates():
    assert validate_model_deployment(with_status(), defaults=False) == []


def test_status_of_a_spec_that_does_not_fit_validates():
    obj = with_status(phase="DoesNotFit", **{"plan.fits": False, "plan.maxConcurrency": 0})
    obj["status"]["conditions"][0].update(status="False", reason="DoesNotFit",
                                          message="max_model_len 131072 needs 16.0 GiB of KV "
                                                  "cache; NVIDIA-L4 leaves 4.0 GiB")
    del obj["status"]["measured"]
    assert validate_model_deployment(obj) == []


@pytest.mark.parametrize("changes, field", [
    ({"phase": "Running"}, "status.phase"),
    ({"conditions.0.status": "Maybe"}, "status.conditions[0].status"),
    ({"conditions.0.lastTransitionTime": "yesterday"}, "status.conditions[0].lastTransitionTime"),
    ({"conditions.1.type": "Planned"}, "status.conditions[1]"),
    ({"conditions.0.reason": "does not fit"}, "status.conditions[0].reason"),
    ({"plan.gpuMemoryBytes": "80Gi"}, "status.plan.gpuMemoryBytes"),
    ({"plan.kvTokens": 61440}, 'unknown field "status.plan.kvTokens"'),
    ({"plan.tensorParallelSize": 2**31}, "status.plan.tensorParallelSize"),
    ({"measured.source": "guess"}, "status.measured.source"),
    ({"plan.alternatives.0.fits": "yes"}, "status.plan.alternatives[0].fits"),
])
def test_status_mistakes_are_refused(changes, field):
    errors = validate_model_deployment(with_status(**changes))
    assert any(names(e, field) for e in errors), errors


def test_conditions_need_the_standard_fields():
    obj = with_status()
    del obj["status"]["conditions"][0]["reason"]
    assert "status.conditions[0].reason: Required value" in validate_model_deployment(obj)


# --- the CEL evaluator itself ------------------------------------------------------------------


def test_cel_sees_what_kubernetes_exposes():
    engine = SCHEMA["properties"]["spec"]["properties"]["engine"]
    seen = to_cel(engine, {"maxModelLen": "32k", "gpuMemoryUtilization": 0.9, "blockSize": 16})
    assert dict(seen) == {"maxModelLen": "32k", "blockSize": 16}  # untyped: invisible
    dashed = to_cel({"type": "object", "properties": {"a-b": {"type": "number"}}}, {"a-b": 1})
    assert dict(dashed) == {"a__dash__b": 1.0} and type(dashed["a__dash__b"]).__name__ == \
        "DoubleType"


def test_cel_transition_rules_need_an_old_value():
    schema = {"type": "object", "properties": {"device": {
        "type": "string", "description": "d",
        "x-kubernetes-validations": [{"rule": "self == oldSelf",
                                      "message": "spec.device is immutable"}]}}}
    assert check_rules(schema, {"device": "cpu"}) == []
    assert check_rules(schema, {"device": "cpu"}, old={"device": "cpu"}) == []
    assert check_rules(schema, {"device": "cpu"}, old={"device": "gpu"}) == \
        ["device: Invalid value: spec.device is immutable"]


def test_cel_substring_matches_cel_go():
    schema = {"type": "string", "x-kubernetes-validations": [
        {"rule": "self.substring(0, size(self) - 1) == '25.6' && self.substring(4) == 'k'",
         "message": "spec.x"}]}
    assert check_rules(schema, "25.6k") == []
    assert check_rules(schema, "25.7k") == ["<root>: Invalid value: spec.x"]


# --- kubectl -----------------------------------------------------------------------------------

# Just enough discovery for kubectl to map the CRD's and the examples' kinds to resources.
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
        for g, v in (("apiextensions.k8s.io", "v1"), ("brim.dev", "v1alpha1"))]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": []},
    "/apis/apiextensions.k8s.io/v1": {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apiextensions.k8s.io/v1",
        "resources": [{"name": "customresourcedefinitions", "singularName":
                       "customresourcedefinition", "namespaced": False,
                       "kind": "CustomResourceDefinition", "verbs": ["create", "get", "list"],
                       "shortNames": ["crd"]}]},
    "/apis/brim.dev/v1alpha1": {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "brim.dev/v1alpha1",
        "resources": [{"name": "modeldeployments", "singularName": "modeldeployment",
                       "namespaced": True, "kind": "ModelDeployment",
                       "verbs": ["create", "get", "list"], "shortNames": ["md"]}]},
}


class _Discovery(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = DISCOVERY.get(self.path.split("?")[0])
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body or {"kind": "Status", "code": 404}).encode())

    def log_message(self, *_):
        pass


@pytest.fixture(scope="module")
def discovery_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def kubectl_dry_run(server: str, path: Path, tmp_path: Path) -> dict:
    kubeconfig = tmp_path / "kubeconfig"  # an empty one: nothing of the user's is read
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    result = subprocess.run(
        [KUBECTL, "create", "--dry-run=client", "--validate=false", "-o", "json",
         "--server", server, "--kubeconfig", str(kubeconfig), "--cache-dir",
         str(tmp_path / "cache"), "-f", str(path)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_reads_the_crd(discovery_server, tmp_path):
    out = kubectl_dry_run(discovery_server, CRD_PATH, tmp_path)
    assert out == CRD


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_kubectl_reads_the_examples(discovery_server, tmp_path, path):
    out = kubectl_dry_run(discovery_server, path, tmp_path)
    # kubectl mapped the kind to a namespaced resource: it fills in the default namespace.
    assert out["metadata"].pop("namespace") == "default"
    assert out == yaml.safe_load(path.read_text())
