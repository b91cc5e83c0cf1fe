"""The scale subresource: a scalable object's replica counts, read and written as an
autoscaling/v1 Scale."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.operator.emulator.errors import ApiError, bad_request, conflict
from tests.operator.emulator.jsonpath import _jsonpath_set, jsonpath
from tests.operator.emulator.resources import ResourceType
from tests.operator.emulator.selectors import format_label_selector


class ScaleSubresource:
    """GET and PUT/PATCH of `/scale`, mixed into `Store`: it reads through the store's `get` and
    writes through its `_next_version` and `_write`, under its lock."""

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
