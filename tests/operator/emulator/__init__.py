"""An in-memory Kubernetes API server for the operator's tests: kopf, kubectl and the Python
client talk to it over real HTTP as they would to a kube-apiserver.

Why not kmock: `kmock.KubernetesEmulator` (0.8) was the starting point, but each of its gaps sits
in the part a subclass would have to keep. It parses `/api/v1/namespaces` into a 500 and
`/api/v1/namespaces/<name>` as "namespace <name>, no resource"; it has no PUT; its store has no
resourceVersion, uid, generation or status subresource; its watch replays and then subscribes, so
an event in between is lost. Filling those in means replacing its request parser, its store, its
watch, its discovery and its error rendering, which is all of it. So this is a small server on
aiohttp, sharing no code with kmock.

The layers, top to bottom, and the modules that hold them:

    KubeEmulator  handle.py: the handle tests hold: a background thread with its own event loop, a
                  kubeconfig, direct synchronous access to objects ("play the kubelet"),
                  validators, faults, the audit log, a kubectl runner
    ApiServer     server.py: HTTP: URL routing, RBAC verbs, JSON/Table responses, watch streams;
                  with discovery.py (discovery documents) and audit.py (audit log, faults)
    Store         store.py: objects, the cluster-wide resourceVersion, the event history that
                  watches replay (watch.py), status separation, generation, finalizers, admission,
                  CRDs; with collector.py (garbage collection, namespace and CRD cleanup) and
                  scale.py (the scale subresource)

and beneath them, used by those: resources.py (resource types, built-in and from CRDs), errors.py
(Status errors), metadata.py (server-set metadata, names), defaults.py (schema pruning and
defaulting, built-in defaults), patches.py, selectors.py, jsonpath.py, tables.py. `__main__.py`
serves a cluster for trying the operator: `python -m tests.operator.emulator --help`.

What is faithful: the REST paths, verbs, Status errors (reason, code, details), resourceVersion as a
cluster-wide counter with 409 Conflict on stale writes, uid, generation (bumped on spec changes
only), creationTimestamp, the status and scale subresources, finalizers and deletionTimestamp,
ownerReference garbage collection (background, foreground, orphan), namespace termination, label
and field selectors on list and watch (an object relabelled out of a selector is DELETED from that
watch), watches from a resourceVersion with no lost events and a 410 Expired once history is
compacted, bookmarks, pagination, server-side Tables from a CRD's printer columns, and CRD
registration with structural-schema pruning and defaulting.

What is approximated (each place says so): strategic merge patch is a JSON merge patch; server-side
apply merges without field ownership or conflicts; built-in objects get only the defaults noted in
`defaults._builtin_defaults` and no schema validation; built-in Tables have Name and Age columns
only; pods are deleted at once (no kubelet grace period); the garbage collector and the namespace
and CRD cleanup controllers run synchronously, right after the write that triggers them; later
pages of a paginated list read the current state, not a snapshot; a watch sends a bookmark only
when it times out. Absent: authentication and authorization, conversion between a CRD's versions
(all versions share one storage, as with `strategy: None`), OpenAPI documents (so kubectl needs
`--validate=false`) and protobuf request bodies (so kubectl's imperative `create <kind>`
generators fail with 415; `kubectl apply|create -f` work).
"""

from tests.operator.emulator.audit import AuditEntry, AuditLog, Fault, Faults
from tests.operator.emulator.errors import ApiError
from tests.operator.emulator.handle import KubectlError, KubeEmulator
from tests.operator.emulator.resources import ResourceType
from tests.operator.emulator.server import ApiServer
from tests.operator.emulator.store import Store, Validator

__all__ = [
    "ApiError",
    "ApiServer",
    "AuditEntry",
    "AuditLog",
    "Fault",
    "Faults",
    "KubeEmulator",
    "KubectlError",
    "ResourceType",
    "Store",
    "Validator",
]
