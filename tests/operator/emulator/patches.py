"""Patches: JSON merge patch (which also stands in for strategic merge patch), server-side apply's
merge, and JSON patch."""

from __future__ import annotations

import copy
from typing import Any

from tests.operator.emulator.errors import bad_request


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
