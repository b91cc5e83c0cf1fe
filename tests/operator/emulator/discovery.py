"""Discovery: what the server says about itself at `/`, `/version`, `/api`, `/apis`, a group and
a group's version, built from the resource types it serves. kubectl and the Python client read
these to map kinds and short names to URLs."""

from __future__ import annotations

from tests.operator.emulator.errors import ApiError
from tests.operator.emulator.resources import ResourceType, version_priority

SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-brim-emulator", "gitCommit": "",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0",
    "compiler": "gc", "platform": "linux/amd64",
}


def root_paths(types: list[ResourceType]) -> dict:
    """The body of `GET /`: the paths the server serves."""
    paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]
    paths += sorted({f"/apis/{t.group}" for t in types if t.group}
                    | {f"/apis/{t.api_version}" for t in types if t.group})
    return {"paths": paths}


def discovery(types: list[ResourceType], parts: list[str], port: int | None) -> dict:
    """The discovery document at a URL's path segments: APIVersions (`/api`), APIGroupList
    (`/apis`), APIGroup (`/apis/<group>`) or APIResourceList (`/api/v1`,
    `/apis/<group>/<version>`); 404 for a group or version not served."""
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{port}"}]}
    if parts == ["apis"]:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [_group(g, types) for g in _groups(types)]}
    if parts[0] == "apis" and len(parts) == 2:
        if parts[1] not in _groups(types):
            raise ApiError(404, "the server could not find the requested resource", details={})
        return {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1], types)}
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
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": served[0].api_version, "resources": resources}


def _groups(types: list[ResourceType]) -> list[str]:
    return list(dict.fromkeys(t.group for t in types if t.group))


def _group(group: str, types: list[ResourceType]) -> dict:
    versions = sorted({t.version for t in types if t.group == group}, key=version_priority)
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}
