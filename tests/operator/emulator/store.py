"""The store: all objects, the cluster-wide resourceVersion, the change history that watches
replay, and the write pipeline (server-set metadata, status separation, generation, finalizers,
admission, CRD registration). The cleanup controllers and the scale subresource are mixed in
from `collector` and `scale`."""

from __future__ import annotations

import collections
import copy
import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

from tests.operator.emulator.collector import GarbageCollector
from tests.operator.emulator.defaults import _builtin_defaults, apply_defaults, prune
from tests.operator.emulator.errors import (
    ApiError,
    already_exists,
    bad_request,
    conflict,
    invalid,
    not_found,
)
from tests.operator.emulator.metadata import (
    _GENERATE_ALPHABET,
    _SERVER_METADATA,
    _name_errors,
    _now,
    _record_manager,
    _spec_of,
)
from tests.operator.emulator.patches import JsonPatchError, apply_merge, json_patch, merge_patch
from tests.operator.emulator.resources import (
    BUILTIN_TYPES,
    CRDS,
    NAMESPACES,
    SYSTEM_NAMESPACES,
    ResourceType,
    _present,
    types_from_crd,
    validate_crd,
    version_priority,
)
from tests.operator.emulator.scale import ScaleSubresource
from tests.operator.emulator.selectors import FieldSelector, LabelSelector
from tests.operator.emulator.watch import Watcher, WatchEvent

Validator = Callable[[dict, dict | None], list[str]]
"""An admission hook: (new object, old object or None on create) -> error strings; any → 422."""


class Store(GarbageCollector, ScaleSubresource):
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
