"""Defaulting: what a write gains (or, for a custom resource, loses) before it is stored. Custom
resources are pruned and defaulted by their CRD's structural schema, as the apiserver does;
built-in kinds get the few defaults their clients read back."""

from __future__ import annotations

import base64
import copy
from typing import Any

from tests.operator.emulator.metadata import _now
from tests.operator.emulator.resources import (
    CRD_CLEANUP_FINALIZER,
    CRDS,
    NAMESPACES,
    ResourceType,
)


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
