"""Server-side Tables, as `kubectl get` asks for them, and the ages kubectl shows in them."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from typing import Any

from tests.operator.emulator.jsonpath import jsonpath
from tests.operator.emulator.resources import ResourceType


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
