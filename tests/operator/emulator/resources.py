"""Resource types: the built-in catalogue, what a CRD declares, and how an object is served at
one of its resource's versions (all versions share one storage)."""

from __future__ import annotations

import dataclasses
import re


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


def _present(rtype: ResourceType, obj: dict) -> dict:
    """An object as served at `rtype`'s version (versions share storage, unconverted)."""
    if obj.get("apiVersion") == rtype.api_version:
        return obj
    return {**obj, "apiVersion": rtype.api_version}
