"""Validate an object against a CustomResourceDefinition's schema, as the API server would.

The served version's `openAPIV3Schema` is OpenAPI 3.0 plus Kubernetes extensions; it is turned
into a JSON Schema (Draft 2020-12) first:

- `nullable: true` lets the value be null;
- `x-kubernetes-int-or-string: true` allows an integer or a string;
- objects are structural: an object with `properties` rejects fields it does not name (the API
  server prunes or, with strict field validation, refuses them) unless it carries
  `x-kubernetes-preserve-unknown-fields: true`; the root, and any
  `x-kubernetes-embedded-resource`, always allow apiVersion, kind and metadata;
- OpenAPI's boolean `exclusiveMinimum`/`exclusiveMaximum` become JSON Schema's numeric ones;
- `x-kubernetes-list-type: set` means no duplicates.

Not checked here: CEL rules (`x-kubernetes-validations`), `format`, list-map key uniqueness and
ObjectMeta itself.
"""

import difflib
from pathlib import Path

import jsonschema
import yaml

_JUNCTORS = ("allOf", "anyOf", "oneOf")
_RESOURCE_FIELDS = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


def load_crd(path: Path | str) -> dict:
    """The CustomResourceDefinition in a YAML file (one document)."""
    crd = yaml.safe_load(Path(path).read_text())
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{path}: not a CustomResourceDefinition")
    return crd


def validate_against_crd(crd: dict, obj: dict) -> list[str]:
    """Every way `obj` breaks `crd`'s schema, as "field.path: what is wrong"; [] when valid."""
    spec = crd["spec"]
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    served = [v["name"] for v in spec["versions"] if v.get("served")]
    if group != spec["group"] or version not in served:
        return [
            f"apiVersion: {obj.get('apiVersion')!r} is not served by {crd['metadata']['name']} "
            f"(served: {', '.join(spec['group'] + '/' + v for v in served)})"
        ]
    if obj.get("kind") != spec["names"]["kind"]:
        return [f"kind: {obj.get('kind')!r} is not {spec['names']['kind']!r}"]

    (served_version,) = (v for v in spec["versions"] if v["name"] == version)
    schema = _json_schema(served_version["schema"]["openAPIV3Schema"], is_resource=True)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return [message for error in errors for message in _describe(error)]


def _json_schema(node: dict, *, is_resource: bool = False, in_junctor: bool = False) -> dict:
    """`node` (a structural OpenAPI v3 schema) as JSON Schema; the input is left unchanged."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _json_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _json_schema(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(out["additionalProperties"])
    for junctor in _JUNCTORS:
        if junctor in out:
            out[junctor] = [_json_schema(s, in_junctor=True) for s in out[junctor]]
    if "not" in out:
        out["not"] = _json_schema(out["not"], in_junctor=True)

    if is_resource or out.get("x-kubernetes-embedded-resource"):
        out["properties"] = {**_RESOURCE_FIELDS, **out.get("properties", {})}
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        # The usual anyOf: [{type: integer}, {type: string}] beside it only repeats that.
        if all(branch.keys() == {"type"} for branch in out.get("anyOf", [{}])):
            del out["anyOf"]
    for bound in ("Minimum", "Maximum"):
        exclusive = out.get(f"exclusive{bound}")
        if isinstance(exclusive, bool):
            del out[f"exclusive{bound}"]
            if exclusive and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if out.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    # Junctor branches only restrict values; the fields are the outer schema's to declare.
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and not in_junctor
    ):
        out["additionalProperties"] = False
    return out


def _describe(error: jsonschema.ValidationError) -> list[str]:
    path = _field_path(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = sorted(error.schema.get("properties", {}))
        return [
            f"{_field_path([*error.absolute_path, name])}: unknown field {_suggest(name, known)}"
            for name in sorted(set(error.instance) - set(known))
        ]
    return [f"{path}: {error.message}"]


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"(did you mean {close[0]!r}?)" if close else f"(known: {', '.join(known)})"


def _field_path(parts) -> str:
    """spec.endpoints[0].port, or "<root>" for the object itself."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"
