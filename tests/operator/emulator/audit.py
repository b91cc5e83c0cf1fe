"""The audit log (every resource request, named as RBAC names it) and fault injection (requests
made to fail, or to hang and time out)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

from tests.operator.emulator.errors import ApiError


@dataclasses.dataclass(slots=True)
class AuditEntry:
    """One resource request, named as RBAC names it (a ClusterRole rule must allow it)."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core group
    resource: str  # the plural
    subresource: str | None  # status, scale, log
    namespace: str | None  # None for cluster-scoped and all-namespaces requests
    name: str | None = None
    code: int | None = None  # the response's HTTP status; None while a watch still streams

    @property
    def key(self) -> tuple[str, str, str, str | None, str | None]:
        return (self.verb, self.group, self.resource, self.subresource, self.namespace)


class AuditLog:
    """Every resource request the server received, in order; discovery is not recorded (RBAC
    grants it to everyone through `system:discovery`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[AuditEntry] = []

    def append(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __iter__(self) -> Iterator[AuditEntry]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index):
        with self._lock:
            return self._entries[index]

    def keys(self) -> list[tuple[str, str, str, str | None, str | None]]:
        """(verb, group, resource, subresource, namespace) of every request, in order."""
        return [entry.key for entry in self]

    def permissions(self) -> set[tuple[str, str, str]]:
        """What a ClusterRole must grant for these requests: (apiGroup, resource, verb), with
        subresources written as RBAC writes them ("modeldeployments/status")."""
        return {(e.group, f"{e.resource}/{e.subresource}" if e.subresource else e.resource, e.verb)
                for e in self}


@dataclasses.dataclass
class Fault:
    """Make the next `times` matching requests fail with `code`, or hang for `hang` seconds
    (then answer 504, as the apiserver's request timeout does)."""

    verb: str  # an RBAC verb, or "*"
    group: str
    resource: str
    name: str | None = None  # None: any name
    namespace: str | None = None  # None: any namespace
    subresource: str | None = "*"  # "*": with or without a subresource; None: the main resource
    code: int = 500
    times: int = 1
    hang: float | None = None
    message: str | None = None
    hits: int = 0  # how many requests this fault has answered so far

    def matches(self, entry: AuditEntry) -> bool:
        return (self.verb in ("*", entry.verb) and self.group == entry.group
                and self.resource == entry.resource
                and self.subresource in ("*", entry.subresource)
                and self.name in (None, entry.name)
                and self.namespace in (None, entry.namespace))

    def error(self) -> ApiError:
        message = self.message or f"injected fault: {self.verb} {self.resource} -> {self.code}"
        error = ApiError(self.code, message)
        if self.code == 429:
            error.details = {"retryAfterSeconds": 1}
        return error


class Faults:
    """The pending injected faults; the first match answers a request and counts down."""

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, entry: AuditEntry) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(entry):
                    fault.hits += 1
                    if fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
