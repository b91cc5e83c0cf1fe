"""Label and field selectors: the `labelSelector=` and `fieldSelector=` queries of list and watch,
and the `metav1.LabelSelector` objects that deployments and scale paths carry."""

from __future__ import annotations

import re
from typing import Any

from tests.operator.emulator.errors import bad_request
from tests.operator.emulator.jsonpath import _dotted_get
from tests.operator.emulator.resources import ResourceType

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
