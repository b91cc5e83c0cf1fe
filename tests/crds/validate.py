"""Validate a ModelDeployment as a kube-apiserver would on create, without one.

The apiserver decodes the object, drops nulls the schema does not allow, applies the schema's
defaults (`apply_defaults`), then checks it against the structural schema and runs the CEL
rules (`validate_model_deployment`). Here the structural schema is translated to JSON Schema
(draft 4, which OpenAPI v3.0 follows) for `jsonschema`:

    x-kubernetes-int-or-string   -> anyOf [integer, string] (already spelt out in brim's CRD)
    nullable: true               -> type [<type>, "null"]
    object without preserve-unknown-fields -> additionalProperties: false, so an unknown field
                                    is an error, as with kubectl's default --validate=strict
    format int32/int64/date-time -> checked; other formats, like the apiserver, ignored
    x-kubernetes-list-type: map  -> items unique by their keys (checked beside jsonschema)

As in the apiserver, a value of the wrong type blocks the CEL rules (their input would be
meaningless); other schema errors and rule failures are reported together.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from tests.crds.cel import check_rules, format_path

__all__ = ["CRD_PATH", "apply_defaults", "load_crd", "openapi_schema",
           "validate_model_deployment"]

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "modeldeployments.brim.dev.yaml"
API_VERSION = "brim.dev/v1alpha1"
KIND = "ModelDeployment"

# RFC 3339, as metav1.Time writes it (2026-11-28T12:00:00Z) or with an offset / fraction.
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


@lru_cache(maxsize=None)
def load_crd(path: Path = CRD_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def openapi_schema(crd: dict | None = None, version: str = "v1alpha1") -> dict:
    crd = crd or load_crd()
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


# --- defaulting -------------------------------------------------------------------------------

def apply_defaults(obj: dict, schema: dict | None = None) -> dict:
    """A copy of obj with the schema's defaults applied, as the apiserver's structural defaulting.

    A field missing (or null where null is not allowed) gets its `default`, where its parent
    exists; defaults inside a defaulted value apply too. Nulls the schema does not allow and
    that have no default are dropped.
    """
    out = copy.deepcopy(obj)
    _default(out, schema or openapi_schema())
    return out


def _default(value, schema: dict) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key in value and value[key] is None and not sub.get("nullable"):
                if "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                else:
                    del value[key]
            elif key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        additional = schema.get("additionalProperties")
        for key, sub_value in value.items():
            if key in properties:
                _default(sub_value, properties[key])
            elif isinstance(additional, dict):
                _default(sub_value, additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(item, schema["items"])


# --- structural schema -> JSON Schema -----------------------------------------------------------

def to_jsonschema(schema: dict, *, at: tuple = ()) -> dict:
    """The structural schema as draft-4 JSON Schema; `at` is the node's path from the root."""
    out = {k: v for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k not in ("description", "default",
                                                                "nullable", "example")}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: to_jsonschema(v, at=at + (k,))
                             for k, v in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(schema["additionalProperties"],
                                                    at=at + ("*",))
    if isinstance(schema.get("items"), dict):
        out["items"] = to_jsonschema(schema["items"], at=at + ("[]",))
    is_object_meta = at == ("metadata",)  # ObjectMeta: only name/generateName are restricted
    if (schema.get("type") == "object" and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields") and not is_object_meta):
        out["additionalProperties"] = False
    return out


def _check_int32(value) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


def _check_int64(value) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


def _check_date_time(value) -> bool:
    return not isinstance(value, str) or bool(_DATE_TIME.match(value))


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(_check_int32)
_FORMATS.checks("int64")(_check_int64)
_FORMATS.checks("date-time")(_check_date_time)


@lru_cache(maxsize=None)
def _validator(schema_json: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(to_jsonschema(json.loads(schema_json)),
                                      format_checker=_FORMATS)


def schema_errors(obj, schema: dict) -> tuple[list[str], bool]:
    """(messages, whether one is a type error, which keeps CEL rules from running)."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    messages, blocking = [], False
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        text, is_type_error = _describe(error)
        messages += text
        blocking |= is_type_error
    messages += _list_map_duplicates(obj, schema, [])
    return messages, blocking


def _describe(error: jsonschema.ValidationError) -> tuple[list[str], bool]:
    path = list(error.absolute_path)
    where = format_path(path) or "<root>"
    value = error.instance
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    kind, expected = error.validator, error.validator_value
    if kind == "additionalProperties" and expected is False:
        known = set(error.schema.get("properties", {}))
        return [f'unknown field "{format_path(path + [k])}"' for k in value if k not in known], \
            False
    if kind == "required":
        missing = [k for k in expected if k not in value]
        return [f"{format_path(path + [k])}: Required value" for k in missing], False
    if kind == "type":
        return [f"{where}: Invalid value: {shown}: must be of type {expected}"], True
    if kind == "anyOf" and expected == [{"type": "integer"}, {"type": "string"}]:
        return [f"{where}: Invalid value: {shown}: must be an integer or a string"], True
    if kind == "enum":
        return [f"{where}: Unsupported value: {shown}: supported values: "
                + ", ".join(json.dumps(v) for v in expected)], False
    if kind == "pattern":
        return [f"{where}: Invalid value: {shown}: should match '{expected}'"], False
    if kind == "minimum":
        return [f"{where}: Invalid value: {shown}: should be greater than or equal to "
                f"{expected}"], False
    if kind == "maximum":
        return [f"{where}: Invalid value: {shown}: should be less than or equal to "
                f"{expected}"], False
    if kind in ("maxLength", "minLength", "maxItems", "minItems", "maxProperties",
                "minProperties"):
        return [f"{where}: Invalid value: {shown}: {kind} is {expected}"], False
    if kind == "format":
        return [f"{where}: Invalid value: {shown}: must be of format {expected}"], False
    return [f"{where}: Invalid value: {error.message}"], False


def _list_map_duplicates(value, schema: dict, path: list) -> list[str]:
    """Items of an x-kubernetes-list-type: map list must differ in their keys."""
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, sub_value in value.items():
            sub = properties.get(key, additional if isinstance(additional, dict) else None)
            if sub is not None:
                errors += _list_map_duplicates(sub_value, sub, path + [key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = set()
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = tuple(json.dumps(item.get(k)) for k in keys)
                if key in seen:
                    named = ", ".join(f"{k}={item.get(k)}" for k in keys)
                    errors.append(f"{format_path(path + [index])}: Duplicate value: {named}")
                seen.add(key)
        for index, item in enumerate(value):
            errors += _list_map_duplicates(item, schema["items"], path + [index])
    return errors


# --- the whole check ---------------------------------------------------------------------------

def validate_model_deployment(obj: dict, *, old: dict | None = None,
                              defaults: bool = True) -> list[str]:
    """Every error the apiserver would report for creating (or, with old, updating) obj.

    Defaults are applied first, as the apiserver does; defaults=False checks obj as given.
    An empty list means it would be accepted.
    """
    schema = openapi_schema()
    if defaults:
        obj = apply_defaults(obj, schema)
        old = apply_defaults(old, schema) if old is not None else None
    errors = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: Invalid value: {obj.get('apiVersion')!r}: must be "
                      f"{API_VERSION}")
    if obj.get("kind") != KIND:
        errors.append(f"kind: Invalid value: {obj.get('kind')!r}: must be {KIND}")
    metadata = obj.get("metadata") or {}
    if not metadata.get("name") and not metadata.get("generateName"):
        errors.append("metadata.name: Required value: name or generateName is required")
    found, blocking = schema_errors(obj, schema)
    errors += found
    if blocking:
        errors.append("<root>: Invalid value: some validation rules were not checked because "
                      "the object was invalid; correct the existing errors to complete "
                      "validation")
    else:
        errors += check_rules(schema, obj, old=old)
    return errors
