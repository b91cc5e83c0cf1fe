"""The handle tests hold: `KubeEmulator` runs the `ApiServer` in a background thread, writes a
kubeconfig, and gives tests direct, synchronous access to the cluster (to play the kubelet and the
built-in controllers), validators, faults, the audit log and a kubectl runner."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.operator.emulator.audit import AuditLog, Fault, Faults
from tests.operator.emulator.errors import ApiError
from tests.operator.emulator.metadata import _now
from tests.operator.emulator.resources import ResourceType, _present
from tests.operator.emulator.selectors import LabelSelector
from tests.operator.emulator.server import ApiServer
from tests.operator.emulator.store import Store, Validator


class KubeEmulator:
    """The emulated cluster: an `ApiServer` on 127.0.0.1 (a free port) in a background thread
    with its own event loop, plus direct, synchronous access for tests.

    Direct access (`get`, `create`, `apply`, `patch`, `set_status`, `delete`, `rollout`) is how a
    test plays the kubelet and the built-in controllers: it follows the server's rules
    (resourceVersion, generation, status separation, finalizers, garbage collection) and watchers
    see its changes, but it skips validators, faults and the audit log, which are about what
    clients send over HTTP. Objects it returns are copies.

    Resources are named as kubectl names them: "pods", "deploy", "deployments.apps", "md",
    "modeldeployments.brim.dev".
    """

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kube-emulator-"))
        self.store = Store()
        self.audit = AuditLog()
        self.faults = Faults()
        self.server = ApiServer(self.store, self.audit, self.faults)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.kubeconfig = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator",
                                        daemon=True)
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        self.kubeconfig = str(self.workdir / "kubeconfig")
        Path(self.kubeconfig).write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                          "user": "emulator",
                                                          "namespace": "default"}}],
            "current-context": "emulator",
        }))
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def reset(self, *, keep_crds: bool = True) -> None:
        """Remove every object (watchers see them DELETED, finalizers are ignored) except the
        system namespaces and, by default, the CRDs, so their resources stay registered; clear
        faults, validators, pod logs and the audit log."""
        self.store.reset(keep_crds=keep_crds)
        self.faults.clear()
        self.store.validators.clear()
        self.server.pod_logs.clear()
        self.audit.clear()

    # -- direct access --------------------------------------------------------------------------

    def resource(self, ref: str) -> ResourceType:
        """The resource type a kubectl-style name refers to (KeyError if none)."""
        return self.store.resolve(ref)

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict | None:
        """The object, or None if there is none."""
        rtype = self.resource(resource)
        try:
            return copy.deepcopy(_present(rtype, self.store.get(rtype, namespace, name)))
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def list(self, resource: str, namespace: str | None = None, *,
             label_selector: str | dict | None = None) -> list[dict]:
        """Objects of a resource (in one namespace, or all), optionally by label selector
        (a string as in `-l`, or a dict of equalities)."""
        if isinstance(label_selector, dict):
            label_selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        rtype = self.resource(resource)
        items, _ = self.store.list(rtype, namespace, LabelSelector.parse(label_selector))
        return [copy.deepcopy(_present(rtype, obj)) for obj in items]

    def create(self, obj: dict | str, namespace: str | None = None) -> dict:
        """Create an object from a manifest (a dict or one YAML document); its apiVersion and
        kind say which resource. Raises ApiError (e.g. 409 AlreadyExists) as the server would."""
        obj = yaml.safe_load(obj) if isinstance(obj, str) else obj
        rtype = self.store.type_for(obj["apiVersion"], obj["kind"])
        return copy.deepcopy(_present(rtype, self.store.create(rtype, namespace, obj, admit=False)))

    def apply(self, manifests: dict | list | str, namespace: str | None = None) -> list[dict]:
        """Create or update objects, as `kubectl apply` would: each manifest (a dict, a list, or
        YAML with one or more documents) is created, or merged into the existing object."""
        if isinstance(manifests, str):
            manifests = [d for d in yaml.safe_load_all(manifests) if d]
        elif isinstance(manifests, dict):
            manifests = [manifests]
        result = []
        for manifest in manifests:
            rtype = self.store.type_for(manifest["apiVersion"], manifest["kind"])
            ns = namespace or manifest.get("metadata", {}).get("namespace")
            obj, _ = self.store.patch(rtype, ns if rtype.namespaced else None,
                                      manifest["metadata"]["name"], "apply", manifest,
                                      admit=False, field_manager="kube-emulator")
            result.append(copy.deepcopy(_present(rtype, obj)))
        return result

    def patch(self, resource: str, name: str, patch: dict, *, namespace: str | None = None,
              subresource: str | None = None) -> dict:
        """JSON-merge-patch an object; subresource="status" patches its status (only)."""
        rtype = self.resource(resource)
        obj, _ = self.store.patch(rtype, namespace, name, "merge", patch, subresource=subresource,
                                  admit=False)
        return copy.deepcopy(_present(rtype, obj))

    def set_status(self, resource: str, name: str, status: dict, *,
                   namespace: str | None = None) -> dict:
        """Replace an object's whole status, as a controller or the kubelet would."""
        rtype = self.resource(resource)
        with self.store.lock:
            current = self.store.get(rtype, namespace, name)
            obj = self.store.update(rtype, namespace, name, {**current, "status": status},
                                    subresource="status", admit=False)
        return copy.deepcopy(_present(rtype, obj))

    def delete(self, resource: str, name: str, *, namespace: str | None = None,
               propagation: str | None = None, force: bool = False) -> dict | None:
        """Delete an object as the API does (finalizers hold it, marked with a
        deletionTimestamp); force=True removes it at once. Returns what is left, None if gone."""
        rtype = self.resource(resource)
        with self.store.lock:
            if force:
                self.store.remove(rtype, namespace, name)
            else:
                self.store.delete(rtype, namespace, name, propagation=propagation)
        return self.get(resource, name, namespace)

    def wait_for(self, resource: str, name: str, predicate: Callable[[dict | None], Any] = bool,
                 *, namespace: str | None = None, timeout: float = 10.0) -> dict | None:
        """Block until predicate(object or None) is true; return the object. The default
        predicate waits for the object to exist; `lambda obj: obj is None` waits for it to go.
        Raises TimeoutError with the last state seen."""
        end = time.monotonic() + timeout
        with self.store.changed:
            while True:
                obj = self.get(resource, name, namespace)
                if predicate(obj):
                    return obj
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{resource} {namespace}/{name} did not satisfy the "
                                       f"condition within {timeout}s; last seen: {obj!r}")
                self.store.changed.wait(min(left, 0.5))

    def create_namespace(self, prefix: str = "test") -> str:
        """Create a namespace with a unique name starting with `prefix`; return its name."""
        obj = self.create({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"generateName": f"{prefix}-"}})
        return obj["metadata"]["name"]

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        """What GET pods/<pod>/log returns (empty by default)."""
        self.server.pod_logs[(namespace, pod)] = text

    def rollout(self, deployment: str, namespace: str, *, ready: bool = True,
                pod_ip: str = "127.0.0.1") -> list[dict]:
        """Play the Deployment controller and the kubelet: create the Deployment's pods (its
        spec.replicas of them, from its template, owned by the Deployment, where a real cluster
        puts a ReplicaSet in between), run them (Running, and Ready if `ready`) and write the
        Deployment's status. Existing pods of the Deployment are replaced."""
        dep = self.get("deployments.apps", deployment, namespace)
        if dep is None:
            raise KeyError(f"no deployment {namespace}/{deployment}")
        for pod in self._owned_pods(dep):
            self.delete("pods", pod["metadata"]["name"], namespace=namespace, force=True)
        template = dep["spec"].get("template") or {}
        replicas = dep["spec"].get("replicas", 1)
        now = _now()
        condition = "True" if ready else "False"
        pods = []
        for _ in range(replicas):
            pod = self.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "generateName": f"{deployment}-{uuid.UUID(dep['metadata']['uid']).hex[:10]}-",
                    "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                    "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                        "uid": dep["metadata"]["uid"], "controller": True,
                        "blockOwnerDeletion": True}],
                },
                "spec": copy.deepcopy(template.get("spec") or {}),
            }, namespace)
            containers = (template.get("spec") or {}).get("containers") or []
            pods.append(self.set_status("pods", pod["metadata"]["name"], namespace=namespace,
                                        status={
                "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                "startTime": now,
                "conditions": [{"type": t, "status": condition, "lastTransitionTime": now}
                               for t in ("PodScheduled", "Initialized", "ContainersReady",
                                         "Ready")],
                "containerStatuses": [{"name": c.get("name", ""), "image": c.get("image", ""),
                                       "ready": ready, "started": True, "restartCount": 0,
                                       "state": {"running": {"startedAt": now}}}
                                      for c in containers],
            }))
        num_ready = replicas if ready else 0
        self.set_status("deployments.apps", deployment, namespace=namespace, status={
            "observedGeneration": dep["metadata"]["generation"], "replicas": replicas,
            "updatedReplicas": replicas, "readyReplicas": num_ready,
            "availableReplicas": num_ready, "unavailableReplicas": replicas - num_ready,
            "conditions": [
                {"type": "Available", "status": condition, "lastTransitionTime": now,
                 "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "True", "lastTransitionTime": now,
                 "reason": "NewReplicaSetAvailable"},
            ],
        })
        return pods

    def _owned_pods(self, owner: dict) -> list[dict]:
        uid = owner["metadata"]["uid"]
        return [pod for pod in self.list("pods", owner["metadata"]["namespace"])
                if any(o.get("uid") == uid for o in pod["metadata"].get("ownerReferences") or ())]

    # -- admission and faults -------------------------------------------------------------------

    def add_validator(self, resource: str, validator: Validator) -> Callable[[], None]:
        """Admit writes to `resource` only if validator(new, old or None) returns no errors;
        otherwise the request fails with 422 Invalid carrying the errors. It runs on create,
        update, patch, apply and status/scale writes over HTTP. Returns a function removing it."""
        key = self.resource(resource).key
        with self.store.lock:
            self.store.validators[key].append(validator)

        def remove() -> None:
            with self.store.lock:
                self.store.validators[key].remove(validator)
        return remove

    def fail(self, verb: str, resource: str, *, code: int = 500, times: int = 1,
             name: str | None = None, namespace: str | None = None, subresource: str | None = "*",
             message: str | None = None) -> Fault:
        """Make the next `times` requests matching (RBAC verb or "*", resource, name) fail with
        `code` and a Status body. subresource: "*" matches with or without one, None only the
        main resource, "status" only /status."""
        rtype = self.resource(resource)
        return self.faults.add(Fault(verb, rtype.group, rtype.plural, name, namespace,
                                     subresource, code=code, times=times, message=message))

    def hang(self, verb: str, resource: str, *, seconds: float = 30.0, times: int = 1,
             name: str | None = None, namespace: str | None = None,
             subresource: str | None = "*") -> Fault:
        """Make the next `times` matching requests hang for `seconds` (past the client's
        timeout), then answer 504."""
        rtype = self.resource(resource)
        return self.faults.add(Fault(verb, rtype.group, rtype.plural, name, namespace,
                                     subresource, code=504, times=times, hang=seconds))

    # -- kubectl --------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run kubectl against this server, with a fresh discovery cache each time (so a CRD
        created a moment ago is known). Raises CalledProcessError on failure if `check`."""
        cache = tempfile.mkdtemp(prefix="kubectl-cache-", dir=self.workdir)
        try:
            result = subprocess.run(
                ["kubectl", f"--kubeconfig={self.kubeconfig}", f"--cache-dir={cache}", *args],
                input=input, capture_output=True, text=True, timeout=timeout,
                env={**os.environ, "KUBECONFIG": self.kubeconfig, "HOME": str(self.workdir)})
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if check and result.returncode:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl run; unlike its base class, it shows what kubectl said."""

    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[3:])} exited with {self.returncode}: {self.stderr}"
