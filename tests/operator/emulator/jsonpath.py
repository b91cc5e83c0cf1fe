"""JSONPath: the subset that CRD printer columns and scale paths use, and the dotted field paths
of field selectors."""

from __future__ import annotations

import re
from typing import Any

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


def _dotted_get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj
