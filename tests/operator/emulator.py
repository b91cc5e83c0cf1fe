"""An in-memory Kubernetes API server for the operator's tests: kopf, kubectl and the Python
client talk to it over real HTTP as they would to a kube-apiserver.

Why not kmock: `kmock.KubernetesEmulator` (0.8) was the starting point, but each of its gaps sits
in the part a subclass would have to keep. It parses `/api/v1/namespaces` into a 500 and
`/api/v1/namespaces/<name>` as "namespace <name>, no resource"; it has no PUT; its store has no
resourceVersion, uid, generation or status subresource; its watch replays and then subscribes, so
an event in between is lost. Filling those in means replacing its request parser, its store, its
watch, its discovery and its error rendering, which is all of it. So this is a small server on
aiohttp, sharing no code with kmock.

The layers, top to bottom:

    KubeEmulator  the handle tests hold: a background thread with its own event loop, a kubeconfig,
                  direct synchronous access to objects ("play the kubelet"), validators, faults,
                  the audit log, a kubectl runner
    ApiServer     HTTP: URL routing, RBAC verbs, discovery, JSON/Table responses, watch streams
    Store         objects, the cluster-wide resourceVersion, the event history that watches replay,
                  status separation, generation, finalizers, garbage collection, admission, CRDs

What is faithful: the REST paths, verbs, Status errors (reason, code, details), resourceVersion as a
cluster-wide counter with 409 Conflict on stale writes, uid, generation (bumped on spec changes
only), creationTimestamp, the status and scale subresources, finalizers and deletionTimestamp,
ownerReference garbage collection (background, foreground, orphan), namespace termination, label
and field selectors on list and watch (an object relabelled out of a selector is DELETED from that
watch), watches from a resourceVersion with no lost events and a 410 Expired once history is
compacted, bookmarks, pagination, server-side Tables from a CRD's printer columns, and CRD
registration with structural-schema pruning and defaulting.

What is approximated (each place says so): strategic merge patch is a JSON merge patch; server-side
apply merges without field ownership or conflicts; built-in objects get only the defaults noted in
`_builtin_defaults` and no schema validation; built-in Tables have Name and Age columns only;
pods are deleted at once (no kubelet grace period); the garbage collector and the namespace and
CRD cleanup controllers run synchronously, right after the write that triggers them; later pages
of a paginated list read the current state, not a snapshot; a watch sends a bookmark only when it
times out. Absent: authentication and authorization, conversion between a CRD's versions (all
versions share one storage, as with `strategy: None`), OpenAPI documents (so kubectl needs
`--validate=false`) and protobuf request bodies (so kubectl's imperative `create <kind>`
generators fail with 415; `kubectl apply|create -f` work).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Errors: every failure leaves the server as a `Status` object, shaped like the apiserver's.
# ----------------------------------------------------------------------------------------------

_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A Kubernetes API failure; `status()` is the `Status` body the apiserver would send."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _gr_details(rtype: ResourceType, name: str) -> dict:
    details = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.qualified} "{name}" not found', details=_gr_details(rtype, name))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'{rtype.qualified} "{name}" already exists', reason="AlreadyExists",
                    details=_gr_details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {rtype.qualified} "{name}": {why}',
                    details=_gr_details(rtype, name))


def invalid(rtype: ResourceType, name: str, errors: list[str]) -> ApiError:
    """422 Invalid, as `apierrors.NewInvalid` words it.

    Each error is "field.path: what is wrong" (the apiserver's own format); the part before the
    first ": " becomes the cause's `field` when it contains no spaces.
    """
    causes = []
    for error in errors:
        field, sep, rest = error.partition(": ")
        if sep and " " not in field:
            causes.append({"reason": "FieldValueInvalid", "message": rest, "field": field})
        else:
            causes.append({"reason": "FieldValueInvalid", "message": error})
    summary = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    details = {"name": name, "kind": rtype.kind, "causes": causes}
    if rtype.group:
        details["group"] = rtype.group
    return ApiError(422, f'{rtype.qualified_kind} "{name}" is invalid: {summary}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


# ----------------------------------------------------------------------------------------------
# Resource types: the built-in catalogue and what a CRD declares.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScalePaths:
    """Where a scalable resource keeps its replica counts (a CRD's `subresources.scale`)."""

    spec_replicas: str  # JSON path, e.g. ".spec.replicas"
    status_replicas: str  # JSON path, e.g. ".status.replicas"
    label_selector: str | None  # JSON path to a selector *string*; None: format `.spec.selector`


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served (group, version, plural). All versions of a group/plural share one storage."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()  # of "status", "scale", "log"
    scale: ScalePaths | None = None
    columns: tuple[dict, ...] = ()  # a CRD's additionalPrinterColumns
    schema: dict | None = None  # a CRD's openAPIV3Schema, for pruning and defaulting
    selectable_fields: tuple[str, ...] = ()  # a CRD's selectableFields, as "spec.x" paths
    has_generation: bool = True  # whether metadata.generation is maintained
    is_custom: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """The storage key: every version of a resource reads and writes the same objects."""
        return (self.group, self.plural)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How errors name the resource: `pods`, `deployments.apps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """How validation errors name the kind: `Pod`, `ModelDeployment.brim.dev`."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


_REPLICAS = ScalePaths(".spec.replicas", ".status.replicas", None)


def _builtin(group_version: str, plural: str, kind: str, *, cluster: bool = False,
             short: str = "", sub: str = "", cats: str = "", generation: bool = False,
             scale: bool = False) -> ResourceType:
    group, _, version = group_version.rpartition("/")
    return ResourceType(
        group=group, version=version, plural=plural, kind=kind, namespaced=not cluster,
        short_names=tuple(short.split()), categories=tuple(cats.split()),
        subresources=frozenset(sub.split()) | ({"scale"} if scale else set()),
        scale=_REPLICAS if scale else None, has_generation=generation)


# Built-in resources the operator, its chart and kubectl use. `generation` marks the kinds whose
# strategy maintains metadata.generation in a real apiserver (those with a spec a controller
# observes); the others keep it unset, as there.
BUILTIN_TYPES: tuple[ResourceType, ...] = (
    _builtin("v1", "namespaces", "Namespace", cluster=True, short="ns", sub="status"),
    _builtin("v1", "nodes", "Node", cluster=True, short="no", sub="status"),
    _builtin("v1", "pods", "Pod", short="po", sub="status log", cats="all"),
    _builtin("v1", "events", "Event", short="ev"),
    _builtin("v1", "services", "Service", short="svc", sub="status", cats="all"),
    _builtin("v1", "endpoints", "Endpoints", short="ep"),
    _builtin("v1", "secrets", "Secret"),
    _builtin("v1", "configmaps", "ConfigMap", short="cm"),
    _builtin("v1", "serviceaccounts", "ServiceAccount", short="sa"),
    _builtin("v1", "persistentvolumeclaims", "PersistentVolumeClaim", short="pvc", sub="status"),
    _builtin("apps/v1", "deployments", "Deployment", short="deploy", sub="status", cats="all",
             generation=True, scale=True),
    _builtin("apps/v1", "replicasets", "ReplicaSet", short="rs", sub="status", cats="all",
             generation=True, scale=True),
    _builtin("apps/v1", "statefulsets", "StatefulSet", short="sts", sub="status", cats="all",
             generation=True, scale=True),
    _builtin("apps/v1", "daemonsets", "DaemonSet", short="ds", sub="status", cats="all",
             generation=True),
    _builtin("batch/v1", "jobs", "Job", sub="status", cats="all", generation=True),
    _builtin("batch/v1", "cronjobs", "CronJob", short="cj", sub="status", cats="all",
             generation=True),
    _builtin("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", short="pdb",
             sub="status", generation=True),
    _builtin("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler",
             short="hpa", sub="status", cats="all", generation=True),
    _builtin("apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition",
             cluster=True, short="crd crds", sub="status", cats="api-extensions",
             generation=True),
    _builtin("coordination.k8s.io/v1", "leases", "Lease"),
    _builtin("events.k8s.io/v1", "events", "Event", short="ev"),
    _builtin("rbac.authorization.k8s.io/v1", "roles", "Role"),
    _builtin("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
    _builtin("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", cluster=True),
    _builtin("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding",
             cluster=True),
)

NAMESPACES = ("", "namespaces")
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

_VERSION_RE = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple:
    """Sort key giving Kubernetes' version order: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > foo."""
    match = _VERSION_RE.match(version)
    if not match:
        return (3, version)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))


def types_from_crd(crd: dict) -> list[ResourceType]:
    """The resource types a CustomResourceDefinition serves, one per served version."""
    spec = crd["spec"]
    names = spec["names"]
    result = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        scale = subresources.get("scale")
        result.append(ResourceType(
            group=spec["group"], version=version["name"], plural=names["plural"],
            kind=names["kind"], namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
            subresources=frozenset(k for k in ("status", "scale") if k in subresources),
            scale=ScalePaths(scale["specReplicasPath"], scale["statusReplicasPath"],
                             scale.get("labelSelectorPath")) if scale else None,
            columns=tuple(version.get("additionalPrinterColumns") or ()),
            schema=(version.get("schema") or {}).get("openAPIV3Schema"),
            selectable_fields=tuple(f["jsonPath"].lstrip(".")
                                    for f in version.get("selectableFields") or ()),
            is_custom=True,
        ))
    return result


def validate_crd(crd: dict) -> list[str]:
    """The structural checks the apiserver makes before accepting a CRD (a useful subset)."""
    errors = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    required = {"spec.group": spec.get("group"), "spec.names.plural": names.get("plural"),
                "spec.names.kind": names.get("kind")}
    for field, value in required.items():
        if not value:
            errors.append(f"{field}: Required value")
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(f'spec.scope: Unsupported value: "{spec.get("scope")}": '
                      'supported values: "Cluster", "Namespaced"')
    versions = spec.get("versions") or []
    if not versions:
        errors.append("spec.versions: Invalid value: null: must have exactly one version "
                      "marked as storage version")
    elif sum(bool(v.get("storage")) for v in versions) != 1:
        errors.append("spec.versions: Invalid value: must have exactly one version marked as "
                      "storage version")
    expected = f"{names.get('plural')}.{spec.get('group')}"
    name = crd.get("metadata", {}).get("name")
    if not errors and name != expected:
        errors.append(f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."'
                      f'+spec.group')
    return errors


# ----------------------------------------------------------------------------------------------
# Selectors.
# ----------------------------------------------------------------------------------------------

_LABEL_REQUIREMENT = re.compile(
    r"^(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=|>|<)\s*(?P<value>[-A-Za-z0-9_.]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses: `a in (x,y),b` is two requirements."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


class LabelSelector:
    """A parsed `labelSelector=` query: equality (`=`, `==`, `!=`), set (`in`, `notin`),
    existence (`key`, `!key`) and the numeric `>`/`<`, comma-separated (all must hold)."""

    def __init__(self, requirements: list[tuple[str, str, Any]]):
        self.requirements = requirements  # (key, operator, value or frozenset of values)

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        requirements = []
        for part in _split_top_level(text or ""):
            match = _LABEL_REQUIREMENT.match(part)
            if not match or (match["neg"] and (match["op"] or match["setop"])):
                raise bad_request(f"unable to parse requirement: found '{part}', "
                                  "expected: label selector requirement")
            key = match["key"]
            if match["neg"]:
                requirements.append((key, "!", None))
            elif match["setop"]:
                values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
                requirements.append((key, match["setop"], values))
            elif match["op"]:
                op = "=" if match["op"] == "==" else match["op"]
                if op in "<>" and not match["value"].lstrip("-").isdigit():
                    raise bad_request(f"unable to parse requirement: for '{op}' operator, "
                                      f"the value must be an integer: '{part}'")
                requirements.append((key, op, match["value"]))
            else:
                requirements.append((key, "exists", None))
        return cls(requirements)

    @classmethod
    def from_dict(cls, selector: dict | None) -> LabelSelector:
        """From a `metav1.LabelSelector` (matchLabels and matchExpressions)."""
        return cls.parse(format_label_selector(selector or {}))

    def matches(self, labels: dict | None) -> bool:
        labels = labels or {}
        for key, op, value in self.requirements:
            present = key in labels
            actual = labels.get(key)
            ok = {
                "exists": lambda: present,
                "!": lambda: not present,
                "=": lambda: present and actual == value,
                "!=": lambda: not present or actual != value,
                "in": lambda: present and actual in value,
                "notin": lambda: not present or actual not in value,
                ">": lambda: present and _is_int(actual) and int(actual) > int(value),
                "<": lambda: present and _is_int(actual) and int(actual) < int(value),
            }[op]()
            if not ok:
                return False
        return True


def _is_int(text: str | None) -> bool:
    return text is not None and text.lstrip("-").isdigit()


def format_label_selector(selector: dict) -> str:
    """The string form of a `metav1.LabelSelector`, as `metav1.FormatLabelSelector` writes it."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        parts.append({
            "In": f"{key} in ({','.join(sorted(values))})",
            "NotIn": f"{key} notin ({','.join(sorted(values))})",
            "Exists": key,
            "DoesNotExist": f"!{key}",
        }[op])
    return ",".join(parts)


# The field labels the apiserver accepts in `fieldSelector=` besides metadata.name/namespace.
_FIELD_LABELS: dict[tuple[str, str], set[str]] = {
    ("", "pods"): {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                   "spec.serviceAccountName", "spec.hostNetwork", "status.phase", "status.podIP",
                   "status.nominatedNodeName"},
    ("", "events"): {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                     "involvedObject.uid", "involvedObject.apiVersion",
                     "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                     "reportingComponent", "source", "type"},
    ("", "secrets"): {"type"},
    ("", "nodes"): {"spec.unschedulable"},
    ("", "namespaces"): {"status.phase"},
    ("batch", "jobs"): {"status.successful"},
}


class FieldSelector:
    """A parsed `fieldSelector=` query: `field=value`, `field==value`, `field!=value`, ANDed.
    Unsupported field labels are a 400, as in the apiserver."""

    def __init__(self, requirements: list[tuple[str, bool, str]]):
        self.requirements = requirements  # (field path, equal?, value)

    @classmethod
    def parse(cls, rtype: ResourceType, text: str | None) -> FieldSelector:
        allowed = {"metadata.name", "metadata.namespace"}
        allowed |= _FIELD_LABELS.get(rtype.key, set()) | set(rtype.selectable_fields)
        requirements = []
        for part in _split_top_level(text or ""):
            match = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", part)
            if not match:
                raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
            field, op, value = match.groups()
            if field not in allowed:
                raise bad_request(f'field label not supported: {field}')
            requirements.append((field, op != "!=", value))
        return cls(requirements)

    def matches(self, obj: dict) -> bool:
        for field, equal, value in self.requirements:
            path = "source.component" if field == "source" else field
            actual = _dotted_get(obj, path)
            actual = ("true" if actual else "false") if isinstance(actual, bool) else (
                "" if actual is None else str(actual))
            if (actual == value) != equal:
                return False
        return True


def _dotted_get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


# ----------------------------------------------------------------------------------------------
# Patches.
# ----------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, anything else replaces.

    Also serves `application/strategic-merge-patch+json`, as an approximation: a strategic merge
    patch would merge lists such as `containers` by their `name` and honour `$patch` directives;
    here lists are replaced whole, which is what the operator's patches need.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_merge(live: Any, intent: Any) -> Any:
    """Server-side apply, approximated: the applied configuration is merged into the live object;
    lists of objects that all have a `name` are merged by name (as the associative lists
    `containers`, `env`, `ports` are), other lists are replaced. There is no field ownership: fields
    a manager stops applying are not removed and there are no conflicts between managers."""
    if isinstance(live, dict) and isinstance(intent, dict):
        result = dict(live)
        for key, value in intent.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = apply_merge(live.get(key), value)
        return result
    if _is_named_list(live) and _is_named_list(intent):
        by_name = {item["name"]: item for item in live}
        merged = [apply_merge(by_name.get(item["name"]), item) for item in intent]
        applied = {item["name"] for item in intent}
        return merged + [item for item in live if item["name"] not in applied]
    return copy.deepcopy(intent)


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(item, dict) and "name" in item for item in value)


class JsonPatchError(Exception):
    """A JSON patch that does not apply (a failed `test`, a missing path)."""


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) applied to a copy of `doc`."""
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise bad_request(f"invalid JSON patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        if op == "test":
            if _pointer_get(doc, path) != operation.get("value"):
                raise JsonPatchError(f"testing value {path} failed: test failed")
        elif op == "remove":
            doc = _pointer_remove(doc, path)
        elif op == "add":
            doc = _pointer_add(doc, path, copy.deepcopy(operation.get("value")))
        elif op == "replace":
            _pointer_get(doc, path)  # must exist
            value = copy.deepcopy(operation.get("value"))
            doc = _pointer_add(_pointer_remove(doc, path), path, value)
        elif op in ("move", "copy"):
            value = copy.deepcopy(_pointer_get(doc, operation.get("from", "")))
            if op == "move":
                doc = _pointer_remove(doc, operation["from"])
            doc = _pointer_add(doc, path, value)
        else:
            raise bad_request(f"Unexpected kind: {op}")
    return doc


def _pointer_tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid JSON pointer: {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _pointer_get(doc: Any, path: str) -> Any:
    for token in _pointer_tokens(path):
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise JsonPatchError(f"doc is missing path: {path!r}")
    return doc


def _pointer_parent(doc: Any, path: str) -> tuple[Any, str]:
    tokens = _pointer_tokens(path)
    parent = _pointer_get(doc, "".join("/" + t.replace("~", "~0").replace("/", "~1")
                                       for t in tokens[:-1]))
    return parent, tokens[-1]


def _pointer_add(doc: Any, path: str, value: Any) -> Any:
    if path == "":
        return value
    parent, token = _pointer_parent(doc, path)
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list) and token == "-":
        parent.append(value)
    elif isinstance(parent, list) and token.isdigit() and int(token) <= len(parent):
        parent.insert(int(token), value)
    else:
        raise JsonPatchError(f"add operation does not apply: doc is missing path: {path!r}")
    return doc


def _pointer_remove(doc: Any, path: str) -> Any:
    if path == "":
        return None
    parent, token = _pointer_parent(doc, path)
    if isinstance(parent, dict) and token in parent:
        del parent[token]
    elif isinstance(parent, list) and token.isdigit() and int(token) < len(parent):
        del parent[int(token)]
    else:
        raise JsonPatchError(f"remove operation does not apply: doc is missing path: {path!r}")
    return doc


# ----------------------------------------------------------------------------------------------
# Structural schemas: pruning and defaulting, as the apiserver applies them to custom resources.
# ----------------------------------------------------------------------------------------------

def prune(value: Any, schema: dict | None, *, root: bool = False) -> Any:
    """Drop the fields a structural schema does not declare (unless it preserves unknown ones)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        keep = {"apiVersion", "kind", "metadata"} if root or schema.get(
            "x-kubernetes-embedded-resource") else set()
        result = {}
        for key, item in value.items():
            if key in keep:
                result[key] = item
            elif properties is not None and key in properties:
                result[key] = prune(item, properties[key])
            elif isinstance(additional, dict):
                result[key] = prune(item, additional)
            elif additional is True or (properties is None and additional is None and
                                        schema.get("type") != "object"):
                result[key] = item
        return result
    if isinstance(value, list):
        return [prune(item, schema.get("items")) for item in value]
    return value


def apply_defaults(value: Any, schema: dict | None) -> Any:
    """Fill in the schema's `default:` values for absent fields, recursively, in place."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and isinstance(sub, dict) and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for key in value:
                if key not in (schema.get("properties") or {}):
                    apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list):
        for item in value:
            apply_defaults(item, schema.get("items"))
    return value


# ----------------------------------------------------------------------------------------------
# JSONPath (the subset CRD printer columns and scale paths use) and server-side Tables.
# ----------------------------------------------------------------------------------------------

_JSONPATH_TOKEN = re.compile(
    r"""\.(?P<field>[A-Za-z0-9_$-]+)"""
    r"""|\[(?P<index>-?\d+|\*)\]"""
    r"""|\[['"](?P<quoted>[^'"]+)['"]\]"""
    r"""|\[\?\(@\.(?P<fpath>[A-Za-z0-9_.-]+)\s*(?P<fop>==|!=)\s*"""
    r"""['"]?(?P<fvalue>[^'")]*)['"]?\)\]""")


def jsonpath(obj: Any, path: str) -> list:
    """All values at a simple JSONPath: `.a.b`, `[0]`, `[*]`, `['k.with.dots']`,
    `[?(@.type=="Ready")]`. Braces (`{.a.b}`) are accepted and ignored."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    values, pos = [obj], 0
    while pos < len(path):
        match = _JSONPATH_TOKEN.match(path, pos)
        if not match:
            raise ValueError(f"unsupported JSONPath {path!r} at {path[pos:]!r}")
        pos = match.end()
        step = []
        for value in values:
            if match["field"] is not None or match["quoted"] is not None:
                name = match["field"] if match["field"] is not None else match["quoted"]
                if isinstance(value, dict) and name in value:
                    step.append(value[name])
            elif match["index"] is not None and isinstance(value, list):
                if match["index"] == "*":
                    step.extend(value)
                elif -len(value) <= int(match["index"]) < len(value):
                    step.append(value[int(match["index"])])
            elif match["fpath"] is not None and isinstance(value, list):
                for item in value:
                    actual = _dotted_get(item, match["fpath"])
                    if (str(actual) == match["fvalue"]) == (match["fop"] == "=="):
                        step.append(item)
        values = step
    return values


def _jsonpath_set(obj: dict, path: str, value: Any) -> None:
    """Set a dotted JSONPath (`.spec.replicas`), creating the dicts on the way."""
    parts = path.lstrip(".").split(".")
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """The age kubectl shows (`duration.HumanDuration`): 45s, 3m20s, 15m, 5h10m, 3d4h, 400d."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    if seconds < -1:
        return "<invalid>"
    seconds = max(seconds, 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


_NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}
_AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
               "description": "CreationTimestamp is a timestamp representing the server time "
                              "when this object was created."}


def table(rtype: ResourceType, objects: Iterable[dict], *, include_object: str = "Metadata",
          headers: bool = True, metadata: dict | None = None) -> dict:
    """A meta.k8s.io/v1 Table, as `kubectl get` asks for. A CRD's additionalPrinterColumns follow
    Name (no Age is added when the CRD declares columns, as in the apiserver); built-in kinds get
    Name and Age only (an approximation: the apiserver prints kind-specific columns)."""
    columns = list(rtype.columns) or [_AGE_COLUMN]
    definitions = [_NAME_COLUMN] + [
        {"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
         "description": c.get("description", ""), "priority": c.get("priority", 0)}
        for c in columns]
    rows = []
    for obj in objects:
        cells = [obj["metadata"]["name"]] + [_cell(obj, c) for c in columns]
        row: dict = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata or {},
            "columnDefinitions": definitions if headers else [], "rows": rows}


def _cell(obj: dict, column: dict) -> Any:
    try:
        found = jsonpath(obj, column["jsonPath"])
    except ValueError:
        return None
    if not found or found[0] is None:
        return None
    value, kind = found[0], column.get("type", "string")
    if kind == "date":
        return human_age(value) if isinstance(value, str) else None
    if kind == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    return value if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------------------------------
# The store.
# ----------------------------------------------------------------------------------------------

Validator = Callable[[dict, dict | None], list[str]]
"""An admission hook: (new object, old object or None on create) -> error strings; any → 422."""


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change, as kept in the history that watches replay."""

    resource_version: int
    key: tuple[str, str]  # the storage key of the resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict  # the object after the change (its last state for DELETED)
    old: dict | None  # the object before the change, to move it in or out of a selector


@dataclasses.dataclass(eq=False)
class Watcher:
    """A live watch: the store pushes its events into the queue from whichever thread writes."""

    key: tuple[str, str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def push(self, event: WatchEvent | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apiserver's: no vowels, no 0/1/3


def _name_errors(rtype: ResourceType, name: str) -> list[str]:
    if rtype.key in (NAMESPACES, ("", "services")):
        if len(name) > 63 or not _DNS_LABEL.match(name):
            return [f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 label must '
                    "consist of lower case alphanumeric characters or '-', and must start and "
                    "end with an alphanumeric character"]
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                "consist of lower case alphanumeric characters, '-' or '.', and must start and "
                "end with an alphanumeric character"]
    return []


def _spec_of(obj: dict) -> dict:
    """What metadata.generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# Metadata fields only the server sets; a write's values for them are ignored.
_SERVER_METADATA = ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "name", "namespace", "managedFields",
                    "selfLink")


class Store:
    """All objects, the cluster-wide resourceVersion counter and the change history.

    Thread-safe: the HTTP server (in its own loop's thread) and tests (in theirs) call it under
    one re-entrant lock; nothing under the lock awaits. Stored objects are never changed in place,
    each write stores a new dict, so events and readers can share them.

    A watch registers under the same lock that it reads the history with, so an event is either
    in what it replays or in its queue: never in neither, never in both.
    """

    def __init__(self, *, history_limit: int = 20_000):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified after every write
        self._types: dict[tuple[str, str, str], ResourceType] = {}  # (group, version, plural)
        self._preferred: dict[tuple[str, str], ResourceType] = {}  # storage key -> preferred
        self._objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = (
            collections.defaultdict(dict))  # storage key -> (namespace or "", name) -> object
        self._uids: dict[str, tuple[tuple[str, str], str, str]] = {}
        self._resource_version = 0
        self._history: collections.deque[WatchEvent] = collections.deque()
        self._history_limit = history_limit
        self._compacted = 0  # watches from a resourceVersion below this get 410 Expired
        self._watchers: set[Watcher] = set()
        self.validators: dict[tuple[str, str], list[Validator]] = collections.defaultdict(list)
        self._collecting = False
        self._collect_again = False
        for rtype in BUILTIN_TYPES:
            self._register(rtype)
        for name in SYSTEM_NAMESPACES:
            self.create(self.resolve("namespaces"), None, {"metadata": {"name": name}}, admit=False)

    # -- resource types -------------------------------------------------------------------------

    def _register(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
        versions = [t for t in self._types.values() if t.key == rtype.key]
        self._preferred[rtype.key] = min(versions, key=lambda t: version_priority(t.version))

    def _unregister(self, key: tuple[str, str]) -> None:
        for type_key in [k for k, t in self._types.items() if t.key == key]:
            del self._types[type_key]
        self._preferred.pop(key, None)
        self._objects.pop(key, None)

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self.lock:
            return self._types.get((group, version, plural))

    def types(self) -> list[ResourceType]:
        with self.lock:
            return list(self._types.values())

    def resolve(self, ref: str) -> ResourceType:
        """A resource type from a kubectl-style reference: `pods`, `po`, `Pod`, `deployments.apps`,
        `deployments.v1.apps`, `md`, `modeldeployments.brim.dev`. The core group wins ties."""
        with self.lock:
            candidates = sorted(self._preferred.values(), key=lambda t: t.group != "")
            for rtype in candidates:
                names = {rtype.plural, rtype.singular, rtype.kind.lower(), *rtype.short_names}
                if ref.lower() in names:
                    return rtype
            for rtype in self._types.values():
                for name in (rtype.plural, rtype.singular, rtype.kind.lower()):
                    if ref.lower() == f"{name}.{rtype.version}.{rtype.group}":
                        return rtype
                    if ref.lower() == f"{name}.{rtype.group}":
                        return self._preferred[rtype.key]
        raise KeyError(f"the server doesn't have a resource type {ref!r}")

    def type_for(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        with self.lock:
            for rtype in self._types.values():
                if (rtype.group, rtype.version, rtype.kind) == (group, version, kind):
                    return rtype
        raise KeyError(f'no matches for kind "{kind}" in version "{api_version}"')

    # -- reads ----------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._resource_version

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        with self.lock:
            obj = self._objects[rtype.key].get((namespace or "", name))
            if obj is None:
                raise not_found(rtype, name)
            return obj

    def list(self, rtype: ResourceType, namespace: str | None = None,
             labels: LabelSelector | None = None,
             fields: FieldSelector | None = None) -> tuple[list[dict], int]:
        """Matching objects ordered by namespace and name (etcd's key order), and the
        resourceVersion they were read at."""
        with self.lock:
            items = [obj for (ns, _), obj in sorted(self._objects[rtype.key].items())
                     if (namespace is None or ns == namespace)
                     and (labels is None or labels.matches(obj["metadata"].get("labels")))
                     and (fields is None or fields.matches(obj))]
            return items, self._resource_version

    # -- watches --------------------------------------------------------------------------------

    def watch(self, watcher: Watcher,
              resource_version: str | None) -> tuple[list[WatchEvent], int]:
        """Register a watcher; return the events it must see first, and the resourceVersion
        after which its queue takes over.

        No resourceVersion (or "0"): synthetic ADDED events for every current object. Otherwise:
        every recorded change after that version, or 410 Expired if the history no longer
        reaches back that far.
        """
        with self.lock:
            if resource_version in (None, "", "0"):
                initial = [WatchEvent(self._resource_version, watcher.key, "ADDED", obj, None)
                           for _, obj in sorted(self._objects[watcher.key].items())]
            else:
                try:
                    since = int(resource_version)
                except ValueError:
                    raise bad_request(f"invalid resource version: {resource_version!r}")
                if since < self._compacted:
                    raise ApiError(410, f"too old resource version: {since} "
                                        f"({self._compacted})", reason="Expired")
                initial = [e for e in self._history
                           if e.resource_version > since and e.key == watcher.key]
            self._watchers.add(watcher)
            return initial, self._resource_version

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self._watchers.discard(watcher)

    def close_watches(self) -> None:
        with self.lock:
            for watcher in self._watchers:
                watcher.push(None)

    def compact(self) -> None:
        """Forget the change history, as etcd compaction does: older watches get 410 Expired."""
        with self.lock:
            self._history.clear()
            self._compacted = self._resource_version

    def _emit(self, key: tuple[str, str], type_: str, obj: dict, old: dict | None) -> None:
        event = WatchEvent(self._resource_version, key, type_, obj, old)
        self._history.append(event)
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft().resource_version
        for watcher in self._watchers:
            if watcher.key == key:
                watcher.push(event)
        self.changed.notify_all()

    # -- writes ---------------------------------------------------------------------------------

    def create(self, rtype: ResourceType, namespace: str | None, body: Any, *,
               admit: bool = True, dry_run: bool = False,
               field_manager: str | None = None, operation: str = "Update") -> dict:
        """POST: a new object with server-set metadata, defaults, and admission."""
        if not isinstance(body, dict):
            raise bad_request("the body of the request was not a JSON object")
        with self.lock:
            obj = copy.deepcopy(body)
            meta = obj.get("metadata")
            if not isinstance(meta, dict):
                meta = obj["metadata"] = {}
            self._check_kind(rtype, obj)
            if rtype.namespaced:
                if namespace and meta.get("namespace") not in (None, "", namespace):
                    raise bad_request("the namespace of the provided object does not match the "
                                      "namespace sent on the request")
                namespace = namespace or meta.get("namespace")
                if not namespace:
                    raise bad_request("an empty namespace may not be set during creation")
                self._check_namespace_open(namespace)
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
                namespace = ""
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = self._generate_name(rtype, namespace, meta["generateName"])
            name = meta.get("name")
            if not name:
                raise invalid(rtype, "", ["metadata.name: Required value: name or generateName "
                                          "is required"])
            if (namespace, name) in self._objects[rtype.key]:
                raise already_exists(rtype, name)
            if meta.get("resourceVersion"):
                raise ApiError(500, "resourceVersion should not be set on objects to be created")
            for field in _SERVER_METADATA:
                if field not in ("name", "namespace"):
                    meta.pop(field, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if rtype.has_generation or rtype.is_custom:
                meta["generation"] = 1
            obj = {"apiVersion": rtype.api_version, "kind": rtype.kind,
                   **{k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}}
            if "status" in rtype.subresources:
                obj.pop("status", None)  # status is written through /status only
            _builtin_defaults(rtype, obj, None)
            obj = self._structural(rtype, obj)
            errors = _name_errors(rtype, name)
            if rtype.key == CRDS:
                errors += validate_crd(obj)
            if errors:
                raise invalid(rtype, name, errors)
            if admit:
                self._admit(rtype, obj, None)
            if field_manager:
                _record_manager(obj, field_manager, operation, rtype.api_version, None)
            if dry_run:
                return obj
            self._commit(rtype, obj, None)
            if rtype.key == CRDS:
                self._register_crd(obj)
            if meta.get("ownerReferences"):
                self._collect_garbage()
            return self._objects[rtype.key].get((namespace, name), obj)

    def update(self, rtype: ResourceType, namespace: str | None, name: str, body: Any, *,
               subresource: str | None = None, admit: bool = True, dry_run: bool = False,
               field_manager: str | None = None, operation: str = "Update") -> dict:
        """PUT: replace an object (or only its status, for subresource="status")."""
        with self.lock:
            old = self.get(rtype, namespace, name)
            if rtype.is_custom and isinstance(body, dict) and not (
                    body.get("metadata") or {}).get("resourceVersion"):
                # Custom resources allow no unconditional update (built-ins mostly do).
                raise invalid(rtype, name, ["metadata.resourceVersion: Invalid value: 0x0: "
                                            "must be specified for an update"])
            new = self._next_version(rtype, old, body, subresource=subresource)
            return self._write(rtype, old, new, admit=admit, dry_run=dry_run,
                               field_manager=field_manager, operation=operation,
                               subresource=subresource)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, patch_type: str,
              patch: Any, *, subresource: str | None = None, admit: bool = True,
              dry_run: bool = False, field_manager: str | None = None,
              ) -> tuple[dict, bool]:
        """PATCH with a `json`, `merge`, `strategic` or `apply` patch; returns (object, created).

        Only server-side apply creates a missing object, as in the apiserver.
        """
        with self.lock:
            if patch_type == "apply" and not field_manager:
                raise bad_request("PATCH, application/apply-patch+yaml: fieldManager is required "
                                  "for apply requests")
            try:
                old = self.get(rtype, namespace, name)
            except ApiError:
                if patch_type != "apply" or subresource:
                    raise
                body = dict(patch) if isinstance(patch, dict) else patch
                if isinstance(body, dict):
                    body.setdefault("metadata", {})
                    body["metadata"] = {**body["metadata"], "name": name}
                created = self.create(rtype, namespace, body, admit=admit, dry_run=dry_run,
                                      field_manager=field_manager, operation="Apply")
                return created, True
            if patch_type == "json":
                try:
                    patched = json_patch(_present(rtype, old), patch)
                except JsonPatchError as e:
                    # The apiserver's wording: a generic 422 carrying the patch library's error.
                    raise ApiError(422, "the server rejected our request due to an error in our "
                                        "request", details={
                                            "causes": [{"reason": "UnexpectedServerResponse",
                                                        "message": str(e)}]})
            elif patch_type in ("merge", "strategic"):
                if not isinstance(patch, dict):
                    raise bad_request("a merge patch must be a JSON object")
                patched = merge_patch(old, patch)
            elif patch_type == "apply":
                if not isinstance(patch, dict):
                    raise bad_request("an apply patch must be an object")
                self._check_kind(rtype, patch)
                patched = apply_merge(old, patch)
            else:
                raise ApiError(415, f"the media type of patch {patch_type!r} is not supported")
            new = self._next_version(rtype, old, patched, subresource=subresource)
            operation = "Apply" if patch_type == "apply" else "Update"
            return self._write(rtype, old, new, admit=admit, dry_run=dry_run,
                               field_manager=field_manager, operation=operation,
                               subresource=subresource), False

    def delete(self, rtype: ResourceType, namespace: str | None, name: str, *,
               propagation: str | None = None, preconditions: dict | None = None,
               dry_run: bool = False) -> dict:
        """DELETE: mark with deletionTimestamp while finalizers remain, otherwise remove.

        propagation: "Background" (default: dependents are collected once the owner is gone),
        "Foreground" (the owner stays, with the foregroundDeletion finalizer, until its
        dependents are gone) or "Orphan" (dependents lose the owner reference and stay).
        """
        with self.lock:
            obj = self.get(rtype, namespace, name)
            meta = obj["metadata"]
            preconditions = preconditions or {}
            if preconditions.get("uid") not in (None, meta["uid"]):
                raise conflict(rtype, name, f"Precondition failed: UID in precondition: "
                                            f"{preconditions['uid']}, UID in object meta: "
                                            f"{meta['uid']}")
            if preconditions.get("resourceVersion") not in (None, meta["resourceVersion"]):
                raise conflict(rtype, name, "the object has been modified; please apply your "
                                            "changes to the latest version and try again")
            if dry_run or meta.get("deletionTimestamp"):
                return obj
            if propagation == "Orphan":
                self._orphan_dependents(meta["uid"])
            finalizers = list(meta.get("finalizers") or [])
            if propagation == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            if not finalizers and rtype.key != NAMESPACES:
                return self._remove(rtype.key, obj)
            marked = copy.deepcopy(obj)
            marked["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            if finalizers:
                marked["metadata"]["finalizers"] = finalizers
            if "generation" in meta:  # the apiserver counts a graceful deletion as a change
                marked["metadata"]["generation"] = meta["generation"] + 1
            if rtype.key == NAMESPACES:
                marked.setdefault("status", {})["phase"] = "Terminating"
            self._commit(rtype, marked, obj)
            self._collect_garbage()
            return self._objects[rtype.key].get((namespace or "", name), marked)

    def remove(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        """Remove an object at once, ignoring finalizers (as `reset()` and a CRD's cleanup do)."""
        with self.lock:
            return self._remove(rtype.key, self.get(rtype, namespace, name))

    def reset(self, *, keep_crds: bool = True) -> None:
        """Remove every object except the system namespaces (and the CRDs, if keep_crds)."""
        with self.lock:
            for key in list(self._objects):
                if key == CRDS and keep_crds:
                    continue
                for (ns, name), obj in sorted(self._objects[key].items()):
                    if key == NAMESPACES and name in SYSTEM_NAMESPACES:
                        continue
                    if key in self._objects and (ns, name) in self._objects[key]:
                        self._remove(key, obj, collect=False)

    # -- the write pipeline ---------------------------------------------------------------------

    def _next_version(self, rtype: ResourceType, old: dict, body: Any, *,
                      subresource: str | None) -> dict:
        """What `body` written over `old` becomes: the status subresource's separation, the
        server-owned metadata kept, and the optimistic-concurrency check."""
        if not isinstance(body, dict):
            raise bad_request("the body of the request was not a JSON object")
        meta_in = body.get("metadata") or {}
        name, namespace = old["metadata"]["name"], old["metadata"].get("namespace")
        if meta_in.get("name") not in (None, "", name):
            raise bad_request(f"the name of the object ({meta_in['name']}) does not match the "
                              f"name on the URL ({name})")
        if rtype.namespaced and meta_in.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the "
                              "namespace sent on the request")
        if meta_in.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
            raise conflict(rtype, name, "the object has been modified; please apply your changes "
                                        "to the latest version and try again")
        if subresource == "status":
            new = copy.deepcopy(old)  # a status write changes the status and nothing else
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            return new
        self._check_kind(rtype, body)
        new = copy.deepcopy(body)
        if "status" in rtype.subresources:  # and a main write changes everything but the status
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for field in _SERVER_METADATA:
            if field in old["metadata"]:
                meta[field] = copy.deepcopy(old["metadata"][field])
            else:
                meta.pop(field, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
            if added:
                raise invalid(rtype, name, [
                    f"metadata.finalizers: Forbidden: no new finalizers can be added if the "
                    f"object is being deleted, found new finalizers {sorted(added)}"])
        return new

    def _write(self, rtype: ResourceType, old: dict, new: dict, *, admit: bool, dry_run: bool,
               field_manager: str | None, operation: str, subresource: str | None) -> dict:
        _builtin_defaults(rtype, new, old)
        new = self._structural(rtype, new)
        if "generation" in old["metadata"] and _spec_of(new) != _spec_of(old):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        if new == old:  # a no-op write changes nothing: same resourceVersion, no event
            return old
        name = old["metadata"]["name"]
        errors = validate_crd(new) if rtype.key == CRDS else []
        if errors:
            raise invalid(rtype, name, errors)
        if admit:
            self._admit(rtype, new, old)
        if field_manager:
            _record_manager(new, field_manager, operation, rtype.api_version, subresource)
        if dry_run:
            return new
        self._commit(rtype, new, old)
        if rtype.key == CRDS:
            self._register_crd(new)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not (
                rtype.key == NAMESPACES and (new.get("spec") or {}).get("finalizers")):
            return self._remove(rtype.key, new)
        if meta.get("ownerReferences") != old["metadata"].get("ownerReferences"):
            self._collect_garbage()
        return new

    def _commit(self, rtype: ResourceType, new: dict, old: dict | None) -> None:
        self._resource_version += 1
        meta = new["metadata"]
        meta["resourceVersion"] = str(self._resource_version)
        self._objects[rtype.key][(meta.get("namespace") or "", meta["name"])] = new
        self._uids[meta["uid"]] = (rtype.key, meta.get("namespace") or "", meta["name"])
        self._emit(rtype.key, "ADDED" if old is None else "MODIFIED", new, old)

    def _remove(self, key: tuple[str, str], obj: dict, *, collect: bool = True) -> dict:
        self._resource_version += 1
        meta = obj["metadata"]
        final = {**obj, "metadata": {**meta, "resourceVersion": str(self._resource_version)}}
        del self._objects[key][(meta.get("namespace") or "", meta["name"])]
        self._uids.pop(meta["uid"], None)
        self._emit(key, "DELETED", final, obj)
        if key == CRDS:  # normally empty by now, unless the CRD was removed by force
            instances_key = (obj["spec"]["group"], obj["spec"]["names"]["plural"])
            for _, instance in sorted(self._objects.get(instances_key, {}).items()):
                self._remove(instances_key, instance, collect=False)
            self._unregister(instances_key)
        if collect:
            self._collect_garbage()
        return final

    def _admit(self, rtype: ResourceType, new: dict, old: dict | None) -> None:
        errors: list[str] = []
        for validator in list(self.validators.get(rtype.key, ())):
            errors += validator(copy.deepcopy(_present(rtype, new)),
                                copy.deepcopy(_present(rtype, old)) if old else None) or []
        if errors:
            raise invalid(rtype, new["metadata"].get("name", ""), errors)

    def _structural(self, rtype: ResourceType, obj: dict) -> dict:
        """Prune and default a custom resource by its schema, as the apiserver does on writes."""
        if rtype.schema is None:
            return obj
        return apply_defaults(prune(obj, rtype.schema, root=True), rtype.schema)

    def _check_kind(self, rtype: ResourceType, body: dict) -> None:
        if body.get("kind") not in (None, "", rtype.kind):
            raise bad_request(f"the kind in the data ({body['kind']}) does not match the "
                              f"expected kind ({rtype.kind})")
        if body.get("apiVersion") not in (None, "") and body["apiVersion"].rpartition("/")[0] != \
                rtype.group:
            raise bad_request(f"the API version in the data ({body['apiVersion']}) does not "
                              f"match the expected API version ({rtype.api_version})")

    def _check_namespace_open(self, namespace: str) -> None:
        ns = self._objects[NAMESPACES].get(("", namespace))
        if ns is None:
            raise ApiError(404, f'namespaces "{namespace}" not found',
                           details={"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, f"unable to create new content in namespace {namespace} because "
                                "it is being terminated",
                           reason="Forbidden", details={"name": namespace, "kind": "namespaces"})

    def _generate_name(self, rtype: ResourceType, namespace: str, prefix: str) -> str:
        while True:
            name = prefix[:58] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
            if (namespace, name) not in self._objects[rtype.key]:
                return name

    def _register_crd(self, crd: dict) -> None:
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        objects = self._objects.get(key)
        self._unregister(key)
        for rtype in types_from_crd(crd):
            self._register(rtype)
        if objects:
            self._objects[key] = objects

    # -- garbage collection ---------------------------------------------------------------------

    def _collect_garbage(self) -> None:
        """Run the controllers that clean up after deletions until nothing changes: the garbage
        collector (owner references), the namespace controller and the CRD cleanup. They run
        synchronously, right after the write that triggers them (a real cluster runs them
        asynchronously, within moments)."""
        if self._collecting:
            self._collect_again = True
            return
        self._collecting = True
        try:
            self._collect_again = True
            while self._collect_again:
                self._collect_again = False
                self._collect_pass()
        finally:
            self._collecting = False

    def _collect_pass(self) -> None:
        for key in list(self._objects):
            for (ns, name), obj in sorted(self._objects.get(key, {}).items()):
                if self._objects.get(key, {}).get((ns, name)) is not obj:
                    continue  # changed earlier in this pass; the next pass sees it
                meta = obj["metadata"]
                rtype = self._preferred[key]
                deleting = bool(meta.get("deletionTimestamp"))
                owners = meta.get("ownerReferences") or []
                if owners and not deleting and not any(self._owner_exists(o, ns) for o in owners):
                    self.delete(rtype, ns, name)
                elif deleting and "foregroundDeletion" in (meta.get("finalizers") or ()):
                    dependents = self._dependents(meta["uid"])
                    for dep_key, dep_ns, dep_name in dependents:
                        self.delete(self._preferred[dep_key], dep_ns, dep_name)
                    if not dependents:
                        self._drop_finalizer(rtype, obj, "foregroundDeletion")
                elif deleting and key == NAMESPACES:
                    self._terminate_namespace(obj)
                elif deleting and key == CRDS and CRD_CLEANUP_FINALIZER in meta["finalizers"]:
                    # The CRD stays until its instances are gone (their finalizers hold it).
                    instances_key = (obj["spec"]["group"], obj["spec"]["names"]["plural"])
                    instances = sorted(self._objects.get(instances_key, {}).items())
                    for (inst_ns, inst_name), instance in instances:
                        if not instance["metadata"].get("deletionTimestamp"):
                            self.delete(self._preferred[instances_key], inst_ns, inst_name)
                    if not instances:
                        self._drop_finalizer(rtype, obj, CRD_CLEANUP_FINALIZER)

    def _terminate_namespace(self, namespace: dict) -> None:
        name = namespace["metadata"]["name"]
        remaining = [(key, name, obj_name) for key, objects in self._objects.items()
                     for (ns, obj_name) in objects if ns == name]
        for key, ns, obj_name in remaining:
            obj = self._objects[key].get((ns, obj_name))
            if obj is not None and not obj["metadata"].get("deletionTimestamp"):
                self.delete(self._preferred[key], ns, obj_name)
        if remaining:
            return
        spec_finalizers = (namespace.get("spec") or {}).get("finalizers") or []
        if "kubernetes" in spec_finalizers:
            done = copy.deepcopy(namespace)
            done["spec"]["finalizers"] = [f for f in spec_finalizers if f != "kubernetes"]
            self._commit(self._preferred[NAMESPACES], done, namespace)
            namespace = done
        if not namespace["metadata"].get("finalizers") and not namespace["spec"].get("finalizers"):
            self._remove(NAMESPACES, namespace)

    def _drop_finalizer(self, rtype: ResourceType, obj: dict, finalizer: str) -> None:
        new = copy.deepcopy(obj)
        new["metadata"]["finalizers"] = [f for f in obj["metadata"]["finalizers"] if f != finalizer]
        if not new["metadata"]["finalizers"]:
            del new["metadata"]["finalizers"]
        self._commit(rtype, new, obj)
        if not new["metadata"].get("finalizers"):
            self._remove(rtype.key, new)

    def _owner_exists(self, owner: dict, dependent_namespace: str) -> bool:
        location = self._uids.get(owner.get("uid", ""))
        if location is None:
            return False
        key, namespace, _ = location
        # A namespaced owner must live in its dependent's namespace: the collector looks it up
        # there, and an owner reference across namespaces counts as absent.
        return not self._preferred[key].namespaced or namespace == dependent_namespace

    def _dependents(self, uid: str) -> list[tuple[tuple[str, str], str, str]]:
        return [(key, ns, name) for key, objects in self._objects.items()
                for (ns, name), obj in objects.items()
                if any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or ())]

    def _orphan_dependents(self, uid: str) -> None:
        for key, ns, name in self._dependents(uid):
            old = self._objects[key][(ns, name)]
            new = copy.deepcopy(old)
            new["metadata"]["ownerReferences"] = [
                o for o in old["metadata"]["ownerReferences"] if o.get("uid") != uid]
            if not new["metadata"]["ownerReferences"]:
                del new["metadata"]["ownerReferences"]
            self._commit(self._preferred[key], new, old)

    # -- scale subresource ----------------------------------------------------------------------

    def get_scale(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        """The autoscaling/v1 Scale view of a scalable object."""
        obj = self.get(rtype, namespace, name)
        paths = rtype.scale
        spec_replicas = (jsonpath(obj, paths.spec_replicas) or [0])[0]
        status_replicas = (jsonpath(obj, paths.status_replicas) or [0])[0]
        if paths.label_selector:
            selector = (jsonpath(obj, paths.label_selector) or [""])[0]
        else:
            selector = format_label_selector((obj.get("spec") or {}).get("selector") or {})
        meta = obj["metadata"]
        scale_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                           "creationTimestamp") if k in meta}
        status = {"replicas": status_replicas}
        if selector:
            status["selector"] = selector
        return {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": scale_meta,
                "spec": {"replicas": spec_replicas}, "status": status}

    def update_scale(self, rtype: ResourceType, namespace: str | None, name: str, scale: Any, *,
                     admit: bool = True, dry_run: bool = False) -> dict:
        """PUT/PATCH /scale: write spec.replicas through to the object's specReplicasPath."""
        if not isinstance(scale, dict):
            raise bad_request("the body of the request was not a JSON object")
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid '
                                f'value: {json.dumps(replicas)}: must be greater than or equal '
                                f'to 0', details={"name": name, "group": "autoscaling",
                                                  "kind": "Scale"})
        with self.lock:
            obj = self.get(rtype, namespace, name)
            rv = (scale.get("metadata") or {}).get("resourceVersion")
            if rv not in (None, "", obj["metadata"]["resourceVersion"]):
                raise conflict(rtype, name, "the object has been modified; please apply your "
                                            "changes to the latest version and try again")
            new = copy.deepcopy(obj)
            _jsonpath_set(new, rtype.scale.spec_replicas, replicas)
            self._write(rtype, obj, self._next_version(rtype, obj, new, subresource=None),
                        admit=admit, dry_run=dry_run, field_manager=None, operation="Update",
                        subresource="scale")
            return self.get_scale(rtype, namespace, name)


def _record_manager(obj: dict, manager: str, operation: str, api_version: str,
                    subresource: str | None) -> None:
    """Note who wrote, as managedFields does; field sets are not tracked (see apply_merge)."""
    entries = [e for e in obj["metadata"].get("managedFields") or ()
               if (e.get("manager"), e.get("operation"), e.get("subresource")) !=
               (manager, operation, subresource)]
    entry = {"manager": manager, "operation": operation, "apiVersion": api_version,
             "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": {}}
    if subresource:
        entry["subresource"] = subresource
    obj["metadata"]["managedFields"] = entries + [entry]


_service_ips = iter(f"10.96.{i // 250}.{i % 250 + 2}" for i in range(250 * 250))


def _builtin_defaults(rtype: ResourceType, obj: dict, old: dict | None) -> None:
    """The few defaults of built-in kinds that clients read back. The apiserver sets many more;
    these are the ones the operator and kubectl notice."""
    key, meta = rtype.key, obj["metadata"]
    if key == NAMESPACES:
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        if old is None:
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        else:  # spec.finalizers belongs to the namespace controller (the /finalize subresource)
            obj["spec"] = copy.deepcopy(old.get("spec") or {})
    elif key == ("", "pods") and old is None:
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif key == ("", "services"):
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        old_spec = (old or {}).get("spec") or {}
        if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
            spec["clusterIP"] = old_spec.get("clusterIP") or next(_service_ips)
            spec["clusterIPs"] = [spec["clusterIP"]]
        for port in spec.get("ports") or ():
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    elif key == ("", "secrets"):
        obj.setdefault("type", "Opaque")
        for k, v in (obj.pop("stringData", None) or {}).items():
            obj.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()
    elif key in (("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets")):
        obj.setdefault("spec", {}).setdefault("replicas", 1)
    elif key == CRDS:
        if old is None:
            meta["finalizers"] = list(meta.get("finalizers") or []) + [CRD_CLEANUP_FINALIZER]
        spec = obj.get("spec") or {}
        storage = [v["name"] for v in spec.get("versions") or () if v.get("storage")]
        accepted = {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                    "message": "no conflicts found", "lastTransitionTime": _now()}
        established = {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                       "message": "the initial names have been accepted",
                       "lastTransitionTime": _now()}
        previous = (old or {}).get("status") or {}
        obj["status"] = {
            "acceptedNames": spec.get("names") or {},
            "conditions": previous.get("conditions") or [accepted, established],
            "storedVersions": sorted(set(previous.get("storedVersions") or []) | set(storage)),
        }


def _present(rtype: ResourceType, obj: dict) -> dict:
    """An object as served at `rtype`'s version (versions share storage, unconverted)."""
    if obj.get("apiVersion") == rtype.api_version:
        return obj
    return {**obj, "apiVersion": rtype.api_version}


# ----------------------------------------------------------------------------------------------
# Audit log and fault injection.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class AuditEntry:
    """One resource request, named as RBAC names it (a ClusterRole rule must allow it)."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core group
    resource: str  # the plural
    subresource: str | None  # status, scale, log
    namespace: str | None  # None for cluster-scoped and all-namespaces requests
    name: str | None = None
    code: int | None = None  # the response's HTTP status; None while a watch still streams

    @property
    def key(self) -> tuple[str, str, str, str | None, str | None]:
        return (self.verb, self.group, self.resource, self.subresource, self.namespace)


class AuditLog:
    """Every resource request the server received, in order; discovery is not recorded (RBAC
    grants it to everyone through `system:discovery`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[AuditEntry] = []

    def append(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __iter__(self) -> Iterator[AuditEntry]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index):
        with self._lock:
            return self._entries[index]

    def keys(self) -> list[tuple[str, str, str, str | None, str | None]]:
        """(verb, group, resource, subresource, namespace) of every request, in order."""
        return [entry.key for entry in self]

    def permissions(self) -> set[tuple[str, str, str]]:
        """What a ClusterRole must grant for these requests: (apiGroup, resource, verb), with
        subresources written as RBAC writes them ("modeldeployments/status")."""
        return {(e.group, f"{e.resource}/{e.subresource}" if e.subresource else e.resource, e.verb)
                for e in self}


@dataclasses.dataclass
class Fault:
    """Make the next `times` matching requests fail with `code`, or hang for `hang` seconds
    (then answer 504, as the apiserver's request timeout does)."""

    verb: str  # an RBAC verb, or "*"
    group: str
    resource: str
    name: str | None = None  # None: any name
    namespace: str | None = None  # None: any namespace
    subresource: str | None = "*"  # "*": with or without a subresource; None: the main resource
    code: int = 500
    times: int = 1
    hang: float | None = None
    message: str | None = None
    hits: int = 0  # how many requests this fault has answered so far

    def matches(self, entry: AuditEntry) -> bool:
        return (self.verb in ("*", entry.verb) and self.group == entry.group
                and self.resource == entry.resource
                and self.subresource in ("*", entry.subresource)
                and self.name in (None, entry.name)
                and self.namespace in (None, entry.namespace))

    def error(self) -> ApiError:
        message = self.message or f"injected fault: {self.verb} {self.resource} -> {self.code}"
        error = ApiError(self.code, message)
        if self.code == 429:
            error.details = {"retryAfterSeconds": 1}
        return error


class Faults:
    """The pending injected faults; the first match answers a request and counts down."""

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, entry: AuditEntry) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(entry):
                    fault.hits += 1
                    if fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()


# ----------------------------------------------------------------------------------------------
# HTTP.
# ----------------------------------------------------------------------------------------------

_PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}

SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-brim-emulator", "gitCommit": "",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0",
    "compiler": "gc", "platform": "linux/amd64",
}


@dataclasses.dataclass
class ResourceRequest:
    """A request for a resource, parsed from its URL as the apiserver's RequestInfo is."""

    rtype: ResourceType
    verb: str
    namespace: str | None
    name: str | None
    subresource: str | None
    audit: AuditEntry | None = None  # where the response's code is recorded


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _error_response(error: ApiError) -> web.Response:
    response = _json_response(error.status(), error.code)
    if error.code == 429:
        response.headers["Retry-After"] = "1"
    return response


class ApiServer:
    """The REST protocol over a Store: routing, verbs, discovery, Tables, watch streams, faults
    and the audit log. Runs in one asyncio loop; store calls are synchronous and brief."""

    def __init__(self, store: Store, audit: AuditLog, faults: Faults):
        self.store = store
        self.audit = audit
        self.faults = faults
        self.pod_logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> log text
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None
        self._stopping: asyncio.Event | None = None

    async def start(self) -> int:
        self._stopping = asyncio.Event()
        # handler_cancellation: a watch whose client went away ends instead of lingering.
        server = web.Server(self.handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        self.store.close_watches()
        await self._runner.cleanup()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            parts = [p for p in request.path.split("/") if p]
            if parts[:1] in (["api"], ["apis"]):
                return await self._api(request, parts)
            return self._non_resource(parts)
        except ApiError as error:
            return _error_response(error)
        except Exception as error:  # a bug here, or in a test's validator: tell the client
            logger.exception("the emulated apiserver failed on %s %s", request.method,
                             request.path_qs)
            return _error_response(ApiError(500, f"Internal error: {error!r}"))

    # -- discovery and other non-resource URLs --------------------------------------------------

    def _non_resource(self, parts: list[str]) -> web.Response:
        if not parts:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
            paths += sorted({f"/apis/{t.group}" for t in self.store.types() if t.group}
                            | {f"/apis/{t.api_version}" for t in self.store.types() if t.group})
            return _json_response({"paths": paths})
        if parts == ["version"]:
            return _json_response(SERVER_VERSION)
        if parts[0] in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        # Everything else, /openapi/v2 and /openapi/v3 included, is absent: kubectl then does
        # without OpenAPI (that is why it needs --validate=false).
        raise ApiError(404, "the server could not find the requested resource", details={})

    def _discovery(self, parts: list[str]) -> web.Response:
        types = self.store.types()
        if parts == ["api"]:
            return _json_response({"kind": "APIVersions", "versions": ["v1"],
                                   "serverAddressByClientCIDRs": [
                                       {"clientCIDR": "0.0.0.0/0",
                                        "serverAddress": f"127.0.0.1:{self.port}"}]})
        if parts == ["apis"]:
            return _json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                   "groups": [self._group(g, types) for g in self._groups(types)]})
        if parts[0] == "apis" and len(parts) == 2:
            if parts[1] not in self._groups(types):
                raise ApiError(404, "the server could not find the requested resource",
                               details={})
            return _json_response({"kind": "APIGroup", "apiVersion": "v1",
                                   **self._group(parts[1], types)})
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        served = [t for t in types if (t.group, t.version) == (group, version)]
        if not served:
            raise ApiError(404, "the server could not find the requested resource", details={})
        resources = []
        for rtype in served:
            resources.append({
                "name": rtype.plural, "singularName": rtype.singular,
                "namespaced": rtype.namespaced, "kind": rtype.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch",
                          "update", "watch"],
                **({"shortNames": list(rtype.short_names)} if rtype.short_names else {}),
                **({"categories": list(rtype.categories)} if rtype.categories else {}),
            })
            for sub in sorted(rtype.subresources):
                entry = {"name": f"{rtype.plural}/{sub}", "singularName": "",
                         "namespaced": rtype.namespaced, "kind": rtype.kind,
                         "verbs": ["get", "patch", "update"]}
                if sub == "scale":
                    entry.update(group="autoscaling", version="v1", kind="Scale")
                if sub == "log":
                    entry.update(kind="Pod", verbs=["get"])
                resources.append(entry)
        return _json_response({"kind": "APIResourceList", "apiVersion": "v1",
                               "groupVersion": served[0].api_version, "resources": resources})

    @staticmethod
    def _groups(types: list[ResourceType]) -> list[str]:
        return list(dict.fromkeys(t.group for t in types if t.group))

    @staticmethod
    def _group(group: str, types: list[ResourceType]) -> dict:
        versions = sorted({t.version for t in types if t.group == group}, key=version_priority)
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    # -- resources ------------------------------------------------------------------------------

    def _parse(self, request: web.BaseRequest, parts: list[str]) -> ResourceRequest | None:
        """The resource request a URL names, or None for a discovery URL."""
        if parts[0] == "api":
            if len(parts) <= 2:
                return None
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) <= 3:
                return None
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        # /namespaces/{ns}/{resource}... unless it is the namespace's own /status or /finalize.
        if rest[0] == "namespaces" and len(rest) >= 3 and not (
                len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "the server could not find the requested resource", details={})
        plural, name, subresource = (rest + [None, None])[:3]
        rtype = self.store.lookup(group, version, plural)
        if rtype is None or (namespace is not None and not rtype.namespaced) or (
                rtype.namespaced and name is not None and namespace is None) or (
                subresource is not None and subresource not in rtype.subresources):
            raise ApiError(404, "the server could not find the requested resource", details={})
        method = request.method
        watch = request.query.get("watch") in ("true", "1")
        verb = {
            "GET": "get" if name else ("watch" if watch else "list"),
            "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method)
        if verb is None or (verb in ("create",) and name is not None) or (
                verb in ("update", "patch") and name is None):
            raise ApiError(405, "the server does not allow this method on the requested "
                                "resource", details={})
        return ResourceRequest(rtype, verb, namespace, name, subresource)

    async def _api(self, request: web.BaseRequest, parts: list[str]) -> web.StreamResponse:
        parsed = self._parse(request, parts)
        if parsed is None:
            return self._discovery(parts)
        entry = parsed.audit = AuditEntry(parsed.verb, parsed.rtype.group, parsed.rtype.plural,
                                          parsed.subresource, parsed.namespace, parsed.name)
        self.audit.append(entry)
        fault = self.faults.take(entry)
        try:
            if fault is not None and fault.hang:
                try:
                    await asyncio.wait_for(self._stopping.wait(), fault.hang)
                except TimeoutError:
                    pass
                raise ApiError(504, "Timeout: request did not complete within requested timeout"
                                    " - context deadline exceeded", details={})
            if fault is not None:
                raise fault.error()
            response = await self._serve(request, parsed)
        except ApiError as error:
            response = _error_response(error)
        except Exception as error:
            logger.exception("the emulated apiserver failed on %s %s", request.method,
                             request.path_qs)
            response = _error_response(ApiError(500, f"Internal error: {error!r}"))
        entry.code = response.status
        return response

    async def _serve(self, request: web.BaseRequest, req: ResourceRequest) -> web.StreamResponse:
        query = request.query
        rtype, namespace, name, sub = req.rtype, req.namespace, req.name, req.subresource
        as_table = "as=Table" in request.headers.get("Accept", "")
        dry_run = query.get("dryRun") == "All"
        manager = query.get("fieldManager")
        if req.verb == "watch":
            return await self._watch(request, req)
        if req.verb == "list":
            return self._list(request, req)
        if req.verb == "get":
            if sub == "scale":
                return _json_response(self.store.get_scale(rtype, namespace, name))
            if sub == "log":
                self.store.get(rtype, namespace, name)
                return web.Response(text=self.pod_logs.get((namespace, name), ""))
            obj = _present(rtype, self.store.get(rtype, namespace, name))
            if as_table:
                return _json_response(table(rtype, [obj], include_object=query.get(
                    "includeObject", "Metadata")))
            return _json_response(obj)
        if req.verb == "deletecollection":
            labels = LabelSelector.parse(query.get("labelSelector"))
            fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
            options = await self._body(request, optional=True) or {}
            items, _ = self.store.list(rtype, namespace, labels, fields)
            deleted = []
            for obj in items:
                meta = obj["metadata"]
                try:
                    deleted.append(self.store.delete(
                        rtype, meta.get("namespace"), meta["name"], dry_run=dry_run,
                        propagation=query.get("propagationPolicy",
                                              options.get("propagationPolicy"))))
                except ApiError as error:
                    if error.code != 404:  # deleted meanwhile: fine
                        raise
            return _json_response(self._list_body(rtype, [_present(rtype, o) for o in deleted],
                                                  self.store.resource_version))
        if req.verb == "delete":
            options = await self._body(request, optional=True) or {}
            obj = self.store.delete(
                rtype, namespace, name, dry_run=dry_run,
                propagation=query.get("propagationPolicy", options.get("propagationPolicy")),
                preconditions=options.get("preconditions"))
            return _json_response(_present(rtype, obj))
        body = await self._body(request, yaml_ok=True)
        if req.verb == "create":
            obj = self.store.create(rtype, namespace, body, dry_run=dry_run, field_manager=manager)
            return _json_response(_present(rtype, obj), 201)
        if req.verb == "update":
            if sub == "scale":
                return _json_response(self.store.update_scale(rtype, namespace, name, body,
                                                              dry_run=dry_run))
            obj = self.store.update(rtype, namespace, name, body, subresource=sub,
                                    dry_run=dry_run, field_manager=manager)
            return _json_response(_present(rtype, obj))
        # patch
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        patch_type = _PATCH_TYPES.get(content_type)
        if patch_type is None:
            raise ApiError(415, f"the body of the request was in an unknown format - accepted "
                                f"media types include: {', '.join(_PATCH_TYPES)}")
        if sub == "scale":
            with self.store.lock:
                current = self.store.get_scale(rtype, namespace, name)
                if patch_type == "json":
                    try:
                        scale = json_patch(current, body)
                    except JsonPatchError as e:
                        raise ApiError(422, str(e))
                else:
                    scale = merge_patch(current, body)
                return _json_response(self.store.update_scale(rtype, namespace, name, scale,
                                                              dry_run=dry_run))
        obj, created = self.store.patch(rtype, namespace, name, patch_type, body, subresource=sub,
                                        dry_run=dry_run, field_manager=manager)
        return _json_response(_present(rtype, obj), 201 if created else 200)

    async def _body(self, request: web.BaseRequest, *, optional: bool = False,
                    yaml_ok: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return None
            raise bad_request("the body of the request was empty")
        content_type = request.headers.get("Content-Type", "")
        if "protobuf" in content_type or "cbor" in content_type:
            # Decoding these needs the Go types' schemas. kubectl's imperative generators
            # (`kubectl create namespace|configmap|deployment ...`) send protobuf and fail here;
            # `kubectl apply|create -f` send JSON.
            raise ApiError(415, "the body of the request was in an unknown format - accepted "
                                "media types include: application/json, application/yaml",
                           details={})
        try:
            if yaml_ok and "yaml" in content_type:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except ValueError as e:  # JSONDecodeError and YAMLError's siblings
            raise bad_request(f"the body of the request could not be decoded: {e}")
        except yaml.YAMLError as e:
            raise bad_request(f"the body of the request could not be decoded: {e}")

    def _list_body(self, rtype: ResourceType, items: list[dict], rv: int,
                   cont: str = "", remaining: int | None = None) -> dict:
        metadata: dict = {"resourceVersion": str(rv)}
        if cont:
            metadata["continue"] = cont
            metadata["remainingItemCount"] = remaining
        if not rtype.is_custom:
            # The apiserver leaves kind and apiVersion out of a built-in list's items.
            items = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")}
                     for item in items]
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                "metadata": metadata, "items": items}

    def _list(self, request: web.BaseRequest, req: ResourceRequest) -> web.Response:
        query, rtype = request.query, req.rtype
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
        items, rv = self.store.list(rtype, req.namespace, labels, fields)
        # Pagination: the continue token carries the last key served. Unlike etcd, later pages
        # are read from the current state, not from a snapshot at the first page's version.
        if query.get("continue"):
            try:
                after = json.loads(base64.urlsafe_b64decode(query["continue"]))
            except ValueError:
                raise bad_request("continue key is not valid")
            rv = after["rv"]
            items = [o for o in items
                     if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after["key"]]
        limit = int(query.get("limit") or 0)
        cont, remaining = "", None
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            cont = base64.urlsafe_b64encode(json.dumps(
                {"rv": rv, "key": [last.get("namespace", ""), last["name"]]}).encode()).decode()
            remaining = len(items) - limit
            items = items[:limit]
        items = [_present(rtype, o) for o in items]
        if "as=Table" in request.headers.get("Accept", ""):
            metadata = {"resourceVersion": str(rv), **({"continue": cont} if cont else {})}
            return _json_response(table(rtype, items, metadata=metadata,
                                        include_object=query.get("includeObject", "Metadata")))
        return _json_response(self._list_body(rtype, items, rv, cont, remaining))

    async def _watch(self, request: web.BaseRequest, req: ResourceRequest) -> web.StreamResponse:
        """A watch stream: one JSON event per line, chunked, until timeoutSeconds or the client
        goes. Objects that move into the selectors arrive as ADDED, out of them as DELETED."""
        query, rtype = request.query, req.rtype
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
        if req.name:  # the legacy single-object watch: GET .../name?watch=true
            fields.requirements.append(("metadata.name", True, req.name))
        as_table = "as=Table" in request.headers.get("Accept", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        initial_events = query.get("sendInitialEvents") == "true"
        # As in the apiserver, no timeout (or 0) means a long one; here: until the client goes.
        timeout = float(query.get("timeoutSeconds") or 0) or None

        def matches(obj: dict | None) -> bool:
            return obj is not None and (
                req.namespace is None or obj["metadata"].get("namespace") == req.namespace
            ) and labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)

        loop = asyncio.get_running_loop()
        watcher = Watcher(rtype.key, loop, asyncio.Queue())
        expired = None
        try:
            replay, last_rv = self.store.watch(watcher, query.get("resourceVersion"))
        except ApiError as error:
            if error.code != 410:
                raise
            replay, last_rv, expired = [], 0, error
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        first_table = True

        async def send(type_: str, obj: dict) -> None:
            nonlocal first_table
            if as_table and type_ in ("ADDED", "MODIFIED", "DELETED"):
                obj = table(rtype, [obj], headers=first_table)
                first_table = False
            await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        def bookmark(rv: int, *, initial_end: bool = False) -> dict:
            meta: dict = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}

        try:
            await response.prepare(request)
            req.audit.code = response.status
            if expired is not None:
                await send("ERROR", expired.status())  # the apiserver streams a 410 as an event
                return response
            for event in replay:
                if shown := _shown(event, matches):
                    await send(shown[0], _present(rtype, shown[1]))
            if initial_events:
                await send("BOOKMARK", bookmark(last_rv, initial_end=True))
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:  # the server is stopping
                    break
                # Every event taken counts, shown or not: a bookmark promises that nothing up to
                # its resourceVersion is still to come.
                last_rv = event.resource_version
                if shown := _shown(event, matches):
                    await send(shown[0], _present(rtype, shown[1]))
            if bookmarks:  # a last bookmark, so that the client resumes from here
                await send("BOOKMARK", bookmark(last_rv))
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-write: nothing to tell it
            pass
        finally:
            self.store.unwatch(watcher)
        return response


def _shown(event: WatchEvent, matches: Callable[[dict | None], bool]) -> tuple[str, dict] | None:
    """How a change looks through a watch's filter: MODIFIED into view is ADDED, out of view is
    DELETED, outside it nothing."""
    if event.type == "MODIFIED":
        was, now = matches(event.old), matches(event.obj)
        if was and now:
            return "MODIFIED", event.obj
        if now:
            return "ADDED", event.obj
        if was:
            return "DELETED", event.obj
        return None
    return (event.type, event.obj) if matches(event.obj) else None


# ----------------------------------------------------------------------------------------------
# The handle tests hold.
# ----------------------------------------------------------------------------------------------

class KubeEmulator:
    """The emulated cluster: an `ApiServer` on 127.0.0.1 (a free port) in a background thread
    with its own event loop, plus direct, synchronous access for tests.

    Direct access (`get`, `create`, `apply`, `patch`, `set_status`, `delete`, `rollout`) is how a
    test plays the kubelet and the built-in controllers: it follows the server's rules
    (resourceVersion, generation, status separation, finalizers, garbage collection) and watchers
    see its changes, but it skips validators, faults and the audit log, which are about what
    clients send over HTTP. Objects it returns are copies.

    Resources are named as kubectl names them: "pods", "deploy", "deployments.apps", "md",
    "modeldeployments.brim.dev".
    """

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kube-emulator-"))
        self.store = Store()
        self.audit = AuditLog()
        self.faults = Faults()
        self.server = ApiServer(self.store, self.audit, self.faults)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.kubeconfig = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator",
                                        daemon=True)
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        self.kubeconfig = str(self.workdir / "kubeconfig")
        Path(self.kubeconfig).write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                          "user": "emulator",
                                                          "namespace": "default"}}],
            "current-context": "emulator",
        }))
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def reset(self, *, keep_crds: bool = True) -> None:
        """Remove every object (watchers see them DELETED, finalizers are ignored) except the
        system namespaces and, by default, the CRDs, so their resources stay registered; clear
        faults, validators, pod logs and the audit log."""
        self.store.reset(keep_crds=keep_crds)
        self.faults.clear()
        self.store.validators.clear()
        self.server.pod_logs.clear()
        self.audit.clear()

    # -- direct access --------------------------------------------------------------------------

    def resource(self, ref: str) -> ResourceType:
        """The resource type a kubectl-style name refers to (KeyError if none)."""
        return self.store.resolve(ref)

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        """The object, or None if there is none."""
        rtype = self.resource(resource)
        try:
            return copy.deepcopy(_present(rtype, self.store.get(rtype, namespace, name)))
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def list(self, resource: str, namespace: str | None = None, *,
             label_selector: str | dict | None = None) -> list[dict]:
        """Objects of a resource (in one namespace, or all), optionally by label selector
        (a string as in `-l`, or a dict of equalities)."""
        if isinstance(label_selector, dict):
            label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        rtype = self.resource(resource)
        items, _ = self.store.list(rtype, namespace, LabelSelector.parse(label_selector))
        return [copy.deepcopy(_present(rtype, obj)) for obj in items]

    def create(self, obj: dict | str, namespace: str | None = None) -> dict:
        """Create an object from a manifest (a dict or one YAML document); its apiVersion and
        kind say which resource. Raises ApiError (e.g. 409 AlreadyExists) as the server would."""
        obj = yaml.safe_load(obj) if isinstance(obj, str) else obj
        rtype = self.store.type_for(obj["apiVersion"], obj["kind"])
        return copy.deepcopy(_present(rtype, self.store.create(rtype, namespace, obj, admit=False)))

    def apply(self, manifests: dict | list | str, namespace: str | None = None) -> list[dict]:
        """Create or update objects, as `kubectl apply` would: each manifest (a dict, a list, or
        YAML with one or more documents) is created, or merged into the existing object."""
        if isinstance(manifests, str):
            manifests = [d for d in yaml.safe_load_all(manifests) if d]
        elif isinstance(manifests, dict):
            manifests = [manifests]
        result = []
        for manifest in manifests:
            rtype = self.store.type_for(manifest["apiVersion"], manifest["kind"])
            ns = namespace or manifest.get("metadata", {}).get("namespace")
            obj, _ = self.store.patch(rtype, ns if rtype.namespaced else None,
                                      manifest["metadata"]["name"], "apply", manifest,
                                      admit=False, field_manager="kube-emulator")
            result.append(copy.deepcopy(_present(rtype, obj)))
        return result

    def patch(self, resource: str, name: str, patch: dict, *, namespace: str | None = None,
              subresource: str | None = None) -> dict:
        """JSON-merge-patch an object; subresource="status" patches its status (only)."""
        rtype = self.resource(resource)
        obj, _ = self.store.patch(rtype, namespace, name, "merge", patch, subresource=subresource,
                                  admit=False)
        return copy.deepcopy(_present(rtype, obj))

    def set_status(self, resource: str, name: str, status: dict, *,
                   namespace: str | None = None) -> dict:
        """Replace an object's whole status, as a controller or the kubelet would."""
        rtype = self.resource(resource)
        with self.store.lock:
            current = self.store.get(rtype, namespace, name)
            obj = self.store.update(rtype, namespace, name, {**current, "status": status},
                                    subresource="status", admit=False)
        return copy.deepcopy(_present(rtype, obj))

    def delete(self, resource: str, name: str, *, namespace: str | None = None,
               propagation: str | None = None, force: bool = False) -> dict | None:
        """Delete an object as the API does (finalizers hold it, marked with a
        deletionTimestamp); force=True removes it at once. Returns what is left, None if gone."""
        rtype = self.resource(resource)
        with self.store.lock:
            if force:
                self.store.remove(rtype, namespace, name)
            else:
                self.store.delete(rtype, namespace, name, propagation=propagation)
        return self.get(resource, name, namespace)

    def wait_for(self, resource: str, name: str, predicate: Callable[[dict | None], Any] = bool,
                 *, namespace: str | None = None, timeout: float = 10.0) -> dict | None:
        """Block until predicate(object or None) is true; return the object. The default
        predicate waits for the object to exist; `lambda obj: obj is None` waits for it to go.
        Raises TimeoutError with the last state seen."""
        end = time.monotonic() + timeout
        with self.store.changed:
            while True:
                obj = self.get(resource, name, namespace)
                if predicate(obj):
                    return obj
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{resource} {namespace}/{name} did not satisfy the "
                                       f"condition within {timeout}s; last seen: {obj!r}")
                self.store.changed.wait(min(left, 0.5))

    def create_namespace(self, prefix: str = "test") -> str:
        """Create a namespace with a unique name starting with `prefix`; return its name."""
        obj = self.create({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"generateName": f"{prefix}-"}})
        return obj["metadata"]["name"]

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        """What GET pods/<pod>/log returns (empty by default)."""
        self.server.pod_logs[(namespace, pod)] = text

    def rollout(self, deployment: str, namespace: str, *, ready: bool = True,
                pod_ip: str = "127.0.0.1") -> list[dict]:
        """Play the Deployment controller and the kubelet: create the Deployment's pods (its
        spec.replicas of them, from its template, owned by the Deployment, where a real cluster
        puts a ReplicaSet in between), run them (Running, and Ready if `ready`) and write the
        Deployment's status. Existing pods of the Deployment are replaced."""
        dep = self.get("deployments.apps", deployment, namespace)
        if dep is None:
            raise KeyError(f"no deployment {namespace}/{deployment}")
        for pod in self._owned_pods(dep):
            self.delete("pods", pod["metadata"]["name"], namespace=namespace, force=True)
        template = dep["spec"].get("template") or {}
        replicas = dep["spec"].get("replicas", 1)
        now = _now()
        condition = "True" if ready else "False"
        pods = []
        for _ in range(replicas):
            pod = self.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": f"{deployment}-{uuid.UUID(dep['metadata']['uid']).hex[:10]}-",
                    "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                    "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                        "uid": dep["metadata"]["uid"], "controller": True,
                        "blockOwnerDeletion": True}],
                },
                "spec": copy.deepcopy(template.get("spec") or {}),
            }, namespace)
            containers = (template.get("spec") or {}).get("containers") or []
            pods.append(self.set_status("pods", pod["metadata"]["name"], namespace=namespace,
                                        status={
                "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                "startTime": now,
                "conditions": [{"type": t, "status": condition, "lastTransitionTime": now}
                               for t in ("PodScheduled", "Initialized", "ContainersReady",
                                         "Ready")],
                "containerStatuses": [{"name": c.get("name", ""), "image": c.get("image", ""),
                                       "ready": ready, "started": True, "restartCount": 0,
                                       "state": {"running": {"startedAt": now}}}
                                      for c in containers],
            }))
        num_ready = replicas if ready else 0
        self.set_status("deployments.apps", deployment, namespace=namespace, status={
            "observedGeneration": dep["metadata"]["generation"], "replicas": replicas,
            "updatedReplicas": replicas, "readyReplicas": num_ready,
            "availableReplicas": num_ready, "unavailableReplicas": replicas - num_ready,
            "conditions": [
                {"type": "Available", "status": condition, "lastTransitionTime": now,
                 "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "True", "lastTransitionTime": now,
                 "reason": "NewReplicaSetAvailable"},
            ],
        })
        return pods

    def _owned_pods(self, owner: dict) -> list[dict]:
        uid = owner["metadata"]["uid"]
        return [pod for pod in self.list("pods", owner["metadata"]["namespace"])
                if any(o.get("uid") == uid for o in pod["metadata"].get("ownerReferences") or ())]

    # -- admission and faults -------------------------------------------------------------------

    def add_validator(self, resource: str, validator: Validator) -> Callable[[], None]:
        """Admit writes to `resource` only if validator(new, old or None) returns no errors;
        otherwise the request fails with 422 Invalid carrying the errors. It runs on create,
        update, patch, apply and status/scale writes over HTTP. Returns a function removing it."""
        key = self.resource(resource).key
        with self.store.lock:
            self.store.validators[key].append(validator)

        def remove() -> None:
            with self.store.lock:
                self.store.validators[key].remove(validator)
        return remove

    def fail(self, verb: str, resource: str, *, code: int = 500, times: int = 1,
             name: str | None = None, namespace: str | None = None, subresource: str | None = "*",
             message: str | None = None) -> Fault:
        """Make the next `times` requests matching (RBAC verb or "*", resource, name) fail with
        `code` and a Status body. subresource: "*" matches with or without one, None only the
        main resource, "status" only /status."""
        rtype = self.resource(resource)
        return self.faults.add(Fault(verb, rtype.group, rtype.plural, name, namespace,
                                     subresource, code=code, times=times, message=message))

    def hang(self, verb: str, resource: str, *, seconds: float = 30.0, times: int = 1,
             name: str | None = None, namespace: str | None = None,
             subresource: str | None = "*") -> Fault:
        """Make the next `times` matching requests hang for `seconds` (past the client's
        timeout), then answer 504."""
        rtype = self.resource(resource)
        return self.faults.add(Fault(verb, rtype.group, rtype.plural, name, namespace,
                                     subresource, code=504, times=times, hang=seconds))

    # -- kubectl --------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run kubectl against this server, with a fresh discovery cache each time (so a CRD
        created a moment ago is known). Raises CalledProcessError on failure if `check`."""
        cache = tempfile.mkdtemp(prefix="kubectl-cache-", dir=self.workdir)
        try:
            result = subprocess.run(
                ["kubectl", f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache}", *args],
                input=input, capture_output=True, text=True, timeout=timeout,
                env={**os.environ, "KUBECONFIG": self.kubeconfig, "HOME": str(self.workdir)})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if check and result.returncode:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl run; unlike its base class, it shows what kubectl said."""

    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[3:])} exited with {self.returncode}: {self.stderr}"


def main() -> None:
    """Serve the emulated cluster until interrupted, for trying the operator without one:

        python -P -m tests.operator.emulator --workdir /tmp/brim-kube
        KUBECONFIG=/tmp/brim-kube/kubeconfig brim operator
        KUBECONFIG=/tmp/brim-kube/kubeconfig kubectl apply --validate=false \\
            -f crds/modeldeployments.brim.dev.yaml -f examples/bundled.yaml

    It has no kubelet: the plan and the children appear, no pod runs.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the kubeconfig is written")
    parser.add_argument("--gpu-node", action="append", default=[], metavar="PRODUCT:MIB:COUNT",
                        help="add a GPU node, e.g. NVIDIA-L4:23034:1 (repeatable)")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with KubeEmulator(args.workdir) as kube:
        for i, text in enumerate(args.gpu_node):
            product, memory, count = text.split(":")
            kube.create({"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": f"gpu-{i}", "labels": {
                             "nvidia.com/gpu.product": product,
                             "nvidia.com/gpu.memory": memory}}})
            kube.set_status("nodes", f"gpu-{i}", {
                "allocatable": {"nvidia.com/gpu": count},
                "conditions": [{"type": "Ready", "status": "True"}]})
        print(f"serving {kube.url}; KUBECONFIG={kube.kubeconfig}", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
