"""The controllers that clean up after deletions: the garbage collector (owner references), the
namespace controller and the CRD cleanup. In a real cluster they run in the controller manager;
here they are part of the `Store` and run synchronously, right after the write that triggers
them."""

from __future__ import annotations

import copy

from tests.operator.emulator.resources import (
    CRD_CLEANUP_FINALIZER,
    CRDS,
    NAMESPACES,
    ResourceType,
)


class GarbageCollector:
    """The cleanup controllers, mixed into `Store`: they read its `_objects`, `_uids` and
    `_preferred` and write through its `delete`, `_commit` and `_remove`, under its lock; their
    own state is the store's `_collecting` and `_collect_again`."""

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
