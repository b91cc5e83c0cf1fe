"""Object metadata: the fields only the server sets, the rules names follow, what
metadata.generation tracks, and managedFields."""

from __future__ import annotations

import datetime
import re

from tests.operator.emulator.resources import NAMESPACES, ResourceType


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apiserver's: no vowels, no 0/1/3


def _name_errors(rtype: ResourceType, name: str) -> list[str]:
    if rtype.key in (NAMESPACES, ("", "services")):
        if len(name) > 63 or not _DNS_LABEL.match(name):
            return [f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 label must '
                    "consist of lower case alphanumeric characters or '-', and must start and "
                    "end with an alphanumeric character"]
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                "consist of lower case alphanumeric characters, '-' or '.', and must start and "
                "end with an alphanumeric character"]
    return []


def _spec_of(obj: dict) -> dict:
    """What metadata.generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


# Metadata fields only the server sets; a write's values for them are ignored.
_SERVER_METADATA = ("uid", "creationTimestamp", "generation", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "name", "namespace", "managedFields",
                    "selfLink")


def _record_manager(obj: dict, manager: str, operation: str, api_version: str,
                    subresource: str | None) -> None:
    """Note who wrote, as managedFields does; field sets are not tracked (see apply_merge)."""
    entries = [e for e in obj["metadata"].get("managedFields") or ()
               if (e.get("manager"), e.get("operation"), e.get("subresource")) !=
               (manager, operation, subresource)]
    entry = {"manager": manager, "operation": operation, "apiVersion": api_version,
             "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": {}}
    if subresource:
        entry["subresource"] = subresource
    obj["metadata"]["managedFields"] = entries + [entry]
