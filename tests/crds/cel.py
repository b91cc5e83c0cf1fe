"""A CRD's validation rules (`x-kubernetes-validations`), evaluated as the apiserver does.

Each rule runs on the schema node where it sits, for each value present there, with `self`
bound to that value converted by the node's schema (and `oldSelf` to the old value, for
transition rules on an update). What CEL sees follows Kubernetes' `SchemaDeclType`:

    type: integer -> int          type: number -> double       type: string -> string
    format: date-time -> timestamp, format: duration -> duration
    x-kubernetes-int-or-string -> int or string (dyn)
    object with properties -> its declared properties only (names escaped: a-b -> a__dash__b)
    object with additionalProperties -> map          array -> list
    x-kubernetes-preserve-unknown-fields without a type -> not visible at all

cel-python (`celpy`) has CEL's standard functions (size, matches, startsWith, endsWith,
contains, has, all, exists, type, int, double, string). Kubernetes adds libraries it lacks;
the ones brim's CRD uses are implemented below (`substring` of cel-go's strings extension).
Two behaviours differ from cel-go and are avoided in the rules rather than patched here:
comparing values of different types (`1 == 'a'`) is an error in celpy but false in cel-go,
and mixed int/double comparisons (`1 < 1.5`) are not guaranteed; guard with `type(x) == ...`.
"""

from __future__ import annotations

import datetime
import functools
import re

import celpy
from celpy import celtypes

__all__ = ["check_rules", "compile_rule", "format_path", "parse_field_path", "to_cel"]

# Messages name the failure the way the apiserver's field errors do.
REASON_TEXT = {
    "FieldValueInvalid": "Invalid value",
    "FieldValueForbidden": "Forbidden",
    "FieldValueRequired": "Required value",
    "FieldValueDuplicate": "Duplicate value",
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# CEL reserved words; Kubernetes exposes a property with such a name as __<name>__.
_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
             "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
             "void", "while"}
_HIDDEN = object()  # a value CEL does not see (an untyped preserve-unknown-fields node)


def format_path(segments: list[str | int]) -> str:
    """`spec.tolerations[0].key`; a key that is not a plain name in brackets:
    `spec.resources.requests[nvidia.com/gpu]`."""
    out = ""
    for segment in segments:
        if isinstance(segment, int):
            out += f"[{segment}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", segment):
            out += f".{segment}" if out else segment
        else:
            out += f"[{segment}]"
    return out


def parse_field_path(field_path: str) -> list[str]:
    """A rule's fieldPath (`.a.b`, `.requests['nvidia.com/gpu']`) as path segments."""
    segments = []
    for name, key in re.findall(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\['([^']*)'\]", field_path):
        segments.append(name or key)
    return segments


def _escape(name: str) -> str | None:
    """A property name as CEL spells it (Kubernetes' apiservercel.Escape), or None if hidden."""
    if name in _RESERVED:
        return f"__{name}__"
    escaped = (name.replace("__", "__underscores__").replace(".", "__dot__")
               .replace("-", "__dash__").replace("/", "__slash__"))
    return escaped if _IDENTIFIER.match(escaped) else None


def _schema_type(schema: dict) -> str:
    return schema.get("type", "")


def to_cel(schema: dict, value, *, is_root: bool = False):
    """`value` as CEL sees it at a node with this schema; _HIDDEN if CEL cannot see it."""
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool):  # the schema rejects it; keep CEL from reading it as 0/1
            return celtypes.StringType(str(value))
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = _schema_type(schema)
    if kind == "object" or (is_root and not kind):
        if not isinstance(value, dict):
            return _HIDDEN
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            items = {k: to_cel(additional, v) for k, v in value.items()}
            return celtypes.MapType({celtypes.StringType(k): v for k, v in items.items()
                                     if v is not _HIDDEN})
        properties = dict(schema.get("properties", {}))
        if is_root:  # apiVersion, kind, metadata.name, metadata.generateName: always visible
            properties.setdefault("apiVersion", {"type": "string"})
            properties.setdefault("kind", {"type": "string"})
            properties["metadata"] = {"type": "object", "properties": {
                "name": {"type": "string"}, "generateName": {"type": "string"}}}
        fields = {}
        for name, sub in properties.items():
            if name not in value:
                continue
            escaped = _escape(name)
            converted = to_cel(sub, value[name])
            if escaped is not None and converted is not _HIDDEN:
                fields[celtypes.StringType(escaped)] = converted
        return celtypes.MapType(fields)
    if kind == "array":
        if not isinstance(value, list) or "items" not in schema:
            return _HIDDEN
        items = [to_cel(schema["items"], v) for v in value]
        return _HIDDEN if any(v is _HIDDEN for v in items) else celtypes.ListType(items)
    if kind == "string":
        fmt = schema.get("format")
        try:  # a malformed one is the schema's error to report; CEL then sees the text
            if fmt == "date-time":
                return celtypes.TimestampType(
                    datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
            if fmt == "duration":
                return celtypes.DurationType(value)
        except ValueError:
            pass
        return celtypes.StringType(value)
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "number":
        return celtypes.DoubleType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    return _HIDDEN  # no type: preserve-unknown-fields; Kubernetes gives CEL no declaration


# Kubernetes' CEL libraries that celpy lacks (cel-go ext.Strings), as far as the rules need.

def _substring(text, start, end=None):
    text = str(text)
    end = len(text) if end is None else int(end)
    if not 0 <= int(start) <= end <= len(text):
        raise ValueError(f"substring({start}, {end}) out of range for a string of {len(text)}")
    return celtypes.StringType(text[int(start):end])


FUNCTIONS = {"substring": _substring}

_ENVIRONMENT = celpy.Environment()


@functools.lru_cache(maxsize=None)
def compile_rule(rule: str):
    """The rule as a runnable program; raises CELParseError on a syntax error."""
    return _ENVIRONMENT.program(_ENVIRONMENT.compile(rule), functions=FUNCTIONS)


def _evaluate(rule: str, activation: dict):
    """The rule's result, or the error it raised (as a CELEvalError)."""
    try:
        return compile_rule(rule).evaluate(activation)
    except celpy.CELEvalError as error:
        return error


def check_rules(schema: dict, value, *, old=None, path: list | None = None,
                is_root: bool = True) -> list[str]:
    """Messages of every rule that fails, each led by the path of the field it names."""
    path = path or []
    errors: list[str] = []
    if value is None:
        return errors
    for rule in schema.get("x-kubernetes-validations", ()):
        errors += _check_one(rule, schema, value, old, path, is_root)

    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, sub_value in value.items():
            sub_schema = properties.get(key)
            if sub_schema is None and isinstance(additional, dict):
                sub_schema = additional
            if sub_schema is None:
                continue
            sub_old = old.get(key) if isinstance(old, dict) else None
            errors += check_rules(sub_schema, sub_value, old=sub_old, path=path + [key],
                                  is_root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        old_by_key = _correlate(schema, old)
        for index, item in enumerate(value):
            errors += check_rules(schema["items"], item, old=old_by_key(item),
                                  path=path + [index], is_root=False)
    return errors


def _correlate(schema: dict, old):
    """Old items match new ones only in map lists, by their keys (as in Kubernetes)."""
    keys = schema.get("x-kubernetes-list-map-keys")
    if schema.get("x-kubernetes-list-type") != "map" or not keys or not isinstance(old, list):
        return lambda item: None
    index = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
    return lambda item: index.get(tuple(item.get(k) for k in keys)) if isinstance(item, dict) \
        else None


def _check_one(rule: dict, schema: dict, value, old, path: list, is_root: bool) -> list[str]:
    text = rule["rule"]
    is_transition = "oldSelf" in text
    if is_transition and old is None:
        return []  # transition rules run on updates of an existing value only
    self_value = to_cel(schema, value, is_root=is_root)
    if self_value is _HIDDEN:
        return [f"{format_path(path) or '<root>'}: Invalid value: rule {text!r} sits on a node "
                "CEL cannot see (no type)"]
    activation = {"self": self_value}
    if is_transition:
        activation["oldSelf"] = to_cel(schema, old, is_root=is_root)
    result = _evaluate(text, activation)
    if isinstance(result, celtypes.BoolType) and bool(result):
        return []
    where = format_path(path + parse_field_path(rule.get("fieldPath", ""))) or "<root>"
    if isinstance(result, Exception):
        return [f"{where}: Invalid value: rule {text!r} could not be evaluated: {result}"]
    message = rule.get("message")
    if message is None and "messageExpression" in rule:
        message = str(_evaluate(rule["messageExpression"], activation))
    if message is None:
        message = f"failed rule: {text}"
    reason = REASON_TEXT.get(rule.get("reason", "FieldValueInvalid"), "Invalid value")
    return [f"{where}: {reason}: {message}"]
