"""The emulated API server behaves as a kube-apiserver does, as far as the operator, kopf and
kubectl can tell. Each test pins one behaviour those clients rely on (most of which kmock 0.8's
emulator lacks), with exact values, so that a regression fails it."""

from __future__ import annotations

import http.client
import json
import re
import socket
import textwrap
import threading
import time
import uuid
from urllib.parse import urlencode, urlsplit

import kopf
import kopf.testing
import kubernetes
import pytest

from tests.operator.emulator import ApiError

GIZMO_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gizmos.test.brim.dev}
spec:
  group: test.brim.dev
  scope: Namespaced
  names: {plural: gizmos, singular: gizmo, kind: Gizmo, shortNames: [gz], categories: [brim]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas,
              labelSelectorPath: .status.selector}
    additionalPrinterColumns:
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Phase, type: string, jsonPath: .status.phase}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              model: {type: string}
              replicas: {type: integer, default: 1}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""
GIZMOS = "/apis/test.brim.dev/v1/namespaces/{ns}/gizmos"


@pytest.fixture(scope="module")
def gizmos(kube):
    """The Gizmo CRD, registered once for this module (reset() keeps CRDs)."""
    kube.apply(GIZMO_CRD)
    return kube.resource("gz")


def gizmo(name: str, **spec) -> dict:
    return {"apiVersion": "test.brim.dev/v1", "kind": "Gizmo", "metadata": {"name": name},
            "spec": {"model": "tiny", **spec}}


# -- a minimal HTTP client: what goes over the wire is what is under test ----------------------

def call(kube, method: str, path: str, body=None, *, content_type: str = "application/json",
         params: dict | None = None, headers: dict | None = None,
         timeout: float = 10.0) -> tuple[int, dict | str]:
    """One request; returns (status, decoded JSON body or text)."""
    url = urlsplit(kube.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        payload = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        conn.request(method, path + ("?" + urlencode(params) if params else ""), body=payload,
                     headers={"Content-Type": content_type, **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        conn.close()


class WatchStream:
    """A watch request read line by line, as client-go reads one."""

    def __init__(self, kube, path: str, **params):
        url = urlsplit(kube.url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        self.conn.request("GET", f"{path}?{urlencode({'watch': 'true', **params})}")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Transfer-Encoding") == "chunked"

    def __iter__(self):
        while line := self.response.readline():
            yield json.loads(line)

    def next(self) -> dict:
        return next(iter(self))

    def close(self) -> None:
        self.conn.close()


def api_client(kube) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=kube.kubeconfig)


# -- kopf, end to end --------------------------------------------------------------------------

OPERATOR = '''
import os

import kopf
import kubernetes


@kopf.on.login()
def login(**_):
    kubernetes.config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    host = kubernetes.client.Configuration.get_default_copy().host
    return kopf.ConnectionInfo(server=host, insecure=True)


@kopf.on.create("test.brim.dev", "v1", "gizmos")
def gizmo_create(name, namespace, spec, patch, **_):
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
              "data": {"model": spec["model"]}}
    kopf.adopt(config)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, config)
    patch.status["phase"] = "Ready"


@kopf.on.delete("test.brim.dev", "v1", "gizmos")
def gizmo_delete(name, namespace, **_):
    kubernetes.client.CoreV1Api().create_namespaced_config_map(
        namespace, {"metadata": {"name": f"{name}-farewell"}})
'''


def test_kopf_operator_end_to_end(kube, gizmos, namespace, tmp_path, monkeypatch):
    operator = tmp_path / "gizmo_operator.py"
    operator.write_text(OPERATOR)
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig)
    args = ["run", "-A", "--standalone", str(operator)]
    with kopf.testing.KopfRunner(args, registry=kopf.OperatorRegistry(), timeout=30) as runner:
        status, created = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("g1"))
        assert status == 201
        ready = kube.wait_for("gz", "g1", lambda o: o.get("status", {}).get("phase") == "Ready",
                              namespace=namespace)
        assert ready["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert ready["spec"] == {"model": "tiny", "replicas": 1}  # defaulted by the schema
        assert ready["metadata"]["generation"] == 1  # finalizer and status are not spec
        config = kube.wait_for("configmaps", "g1-config", namespace=namespace)
        assert config["data"] == {"model": "tiny"}
        [owner] = config["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "Gizmo", "g1", created["metadata"]["uid"])
        # kopf wrote the status through /status and the finalizer with a guarded JSON patch.
        assert ("patch", "test.brim.dev", "gizmos", "status", namespace) in kube.audit.keys()

        status, deleting = call(kube, "DELETE", GIZMOS.format(ns=namespace) + "/g1")
        assert status == 200 and deleting["metadata"]["deletionTimestamp"]
        kube.wait_for("gz", "g1", lambda o: o is None, namespace=namespace)
        assert kube.get("configmaps", "g1-farewell", namespace) is not None  # on.delete ran
        assert kube.get("configmaps", "g1-config", namespace) is None  # collected with owner
    assert runner.exception is None
    assert runner.exit_code == 0


# -- kubectl -----------------------------------------------------------------------------------

GADGET_CRD = textwrap.dedent("""
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata: {name: gadgets.test.brim.dev}
    spec:
      group: test.brim.dev
      scope: Namespaced
      names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
      versions:
      - name: v1alpha1
        served: true
        storage: true
        subresources:
          status: {}
          scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
        additionalPrinterColumns:
        - {name: Model, type: string, jsonPath: .spec.model}
        - {name: Replicas, type: integer, jsonPath: .spec.replicas}
        - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
        schema:
          openAPIV3Schema:
            type: object
            x-kubernetes-preserve-unknown-fields: true
""")


def test_kubectl_apply_get_describe_scale_delete(kube, namespace, tmp_path):
    crd, manifest = tmp_path / "crd.yaml", tmp_path / "gadget.yaml"
    crd.write_text(GADGET_CRD)
    manifest.write_text(textwrap.dedent(f"""
        apiVersion: test.brim.dev/v1alpha1
        kind: Gadget
        metadata: {{name: llama, namespace: {namespace}}}
        spec: {{model: llama-8b, replicas: 1}}
    """))

    out = kube.kubectl("apply", "--validate=false", "-f", str(crd)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/gadgets.test.brim.dev created" in out
    out = kube.kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    assert "gadget.test.brim.dev/llama created" in out

    lines = kube.kubectl("get", "gd", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "REPLICAS", "AGE"]
    assert lines[1].split()[:3] == ["llama", "llama-8b", "1"]
    assert re.fullmatch(r"\d+s", lines[1].split()[3])

    out = kube.kubectl("describe", "gd", "llama", "-n", namespace).stdout
    assert re.search(r"^Name:\s+llama$", out, re.M)
    assert re.search(r"^Kind:\s+Gadget$", out, re.M)
    assert re.search(r"^\s+Model:\s+llama-8b$", out, re.M)

    out = kube.kubectl("scale", "gd/llama", "--replicas=3", "-n", namespace).stdout
    assert "gadget.test.brim.dev/llama scaled" in out
    scaled = kube.get("gadgets.test.brim.dev", "llama", namespace)
    assert scaled["spec"]["replicas"] == 3
    assert scaled["metadata"]["generation"] == 2

    out = kube.kubectl("get", "gd", "llama", "-n", namespace, "-o", "json").stdout
    assert json.loads(out)["spec"] == {"model": "llama-8b", "replicas": 3}
    assert namespace in kube.kubectl("get", "namespaces").stdout.split()  # a core Table

    out = kube.kubectl("delete", "gd", "llama", "-n", namespace).stdout
    assert 'gadget.test.brim.dev "llama" deleted' in out
    assert kube.get("gd", "llama", namespace) is None
    failed = kube.kubectl("get", "gd", "llama", "-n", namespace, check=False)
    assert failed.returncode == 1
    assert 'gadgets.test.brim.dev "llama" not found' in failed.stderr


# -- watches -----------------------------------------------------------------------------------

def test_watch_loses_no_event_between_list_and_watch(kube, namespace):
    """Writers race list-then-watch readers; every reader's replay of its stream must end at
    exactly the state a final list shows, with strictly increasing resourceVersions."""
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    stop = threading.Event()

    def write_over_http(writer: int) -> None:
        i = 0
        while not stop.is_set():
            name, i = f"http{writer}-{i % 7}", i + 1
            body = {"metadata": {"name": name}, "data": {"i": f"{i}"}}
            status, _ = call(kube, "POST", path, body)
            if status == 409 and i % 3:
                call(kube, "PATCH", f"{path}/{name}", {"data": {"i": f"{i}"}},
                     content_type="application/merge-patch+json")
            elif status == 409:
                call(kube, "DELETE", f"{path}/{name}")

    def write_directly(writer: int) -> None:  # the kubelet's path, from another thread
        i = 0
        while not stop.is_set():
            name, i = f"direct{writer}-{i % 7}", i + 1
            try:
                kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": name}, "data": {"i": f"{i}"}}, namespace)
            except ApiError:
                if i % 3:
                    kube.patch("configmaps", name, {"data": {"i": f"{i}"}}, namespace=namespace)
                else:
                    kube.delete("configmaps", name, namespace=namespace)
            time.sleep(0.001)

    results: list[dict | BaseException] = []

    def read() -> None:
        try:
            status, listing = call(kube, "GET", path)
            since = int(listing["metadata"]["resourceVersion"])
            state = {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
                     for o in listing["items"]}
            stream = WatchStream(kube, path, resourceVersion=since)
            last = since
            for event in stream:
                rv = int(event["object"]["metadata"]["resourceVersion"])
                assert rv > last, f"resourceVersion went from {last} to {rv}: {event['type']}"
                last = rv
                name = event["object"]["metadata"]["name"]
                if event["type"] == "DELETED":
                    del state[name]
                else:
                    assert (event["type"] == "ADDED") == (name not in state), event["type"]
                    state[name] = str(rv)
                if name == "sentinel":
                    break
            stream.close()
            results.append(state)
        except BaseException as error:  # reported by the main thread
            results.append(error)

    writers = [threading.Thread(target=write_over_http, args=(w,)) for w in range(2)]
    writers += [threading.Thread(target=write_directly, args=(w,)) for w in range(2)]
    readers = [threading.Thread(target=read) for _ in range(10)]
    for thread in writers:
        thread.start()
    for reader in readers:  # each one lists and starts watching while the writes go on
        reader.start()
        time.sleep(0.03)
    stop.set()
    for thread in writers:
        thread.join()
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "sentinel"}},
                namespace)
    for reader in readers:
        reader.join(20)
    final = {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
             for o in kube.list("configmaps", namespace)}
    assert len(results) == len(readers)
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result == final


def test_watch_selectors_timeout_bookmark_and_expiry(kube, namespace):
    path = f"/api/v1/namespaces/{namespace}/pods"
    pod = {"metadata": {"name": "p", "labels": {"app": "x", "tier": "web"}},
           "spec": {"containers": [{"name": "c", "image": "i"}]}}
    status, created = call(kube, "POST", path, pod)
    stream = WatchStream(kube, path, labelSelector="app=x,tier!=db", timeoutSeconds="2",
                         allowWatchBookmarks="true")
    started = time.monotonic()
    first = stream.next()
    assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "p")
    kube.patch("pods", "p", {"metadata": {"labels": {"tier": "db"}}}, namespace=namespace)
    kube.patch("pods", "p", {"metadata": {"labels": {"tier": "cache"}}}, namespace=namespace)
    kube.patch("pods", "p", {"metadata": {"annotations": {"a": "1"}}}, namespace=namespace)
    events = [(e["type"], e["object"]["metadata"].get("labels", {}).get("tier")) for e in stream]
    # Out of the selector reads as DELETED, back in as ADDED; the stream ends with a bookmark.
    assert events == [("DELETED", "db"), ("ADDED", "cache"), ("MODIFIED", "cache"),
                      ("BOOKMARK", None)]
    assert 1.9 < time.monotonic() - started < 4
    stream.close()

    kube.store.compact()
    expired = WatchStream(kube, path, resourceVersion=created["metadata"]["resourceVersion"])
    error = expired.next()
    expired.close()
    assert error["type"] == "ERROR"
    assert (error["object"]["code"], error["object"]["reason"]) == (410, "Expired")


# -- object metadata ---------------------------------------------------------------------------

def test_resource_version_uid_generation_and_timestamps(kube, gizmos, namespace):
    status, first = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("a"))
    assert status == 201
    meta = first["metadata"]
    assert uuid.UUID(meta["uid"]).version == 4
    assert meta["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    rv = int(meta["resourceVersion"])

    # resourceVersion is one counter for the whole cluster, across resources and namespaces.
    status, other = call(kube, "POST", "/api/v1/namespaces/default/configmaps",
                         {"metadata": {"generateName": "rv-"}})
    assert re.fullmatch(r"rv-[b-z2-9]{5}", other["metadata"]["name"])
    assert int(other["metadata"]["resourceVersion"]) == rv + 1
    call(kube, "DELETE", f"/api/v1/namespaces/default/configmaps/{other['metadata']['name']}")

    url = GIZMOS.format(ns=namespace) + "/a"
    merge = "application/merge-patch+json"
    _, labelled = call(kube, "PATCH", url, {"metadata": {"labels": {"x": "y"}}}, content_type=merge)
    assert labelled["metadata"]["generation"] == 1  # metadata is not spec
    assert int(labelled["metadata"]["resourceVersion"]) > rv + 1
    _, same = call(kube, "PATCH", url, {"metadata": {"labels": {"x": "y"}}}, content_type=merge)
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]  # no-op
    _, respec = call(kube, "PATCH", url, {"spec": {"model": "big"}}, content_type=merge)
    assert respec["metadata"]["generation"] == 2
    assert respec["metadata"]["uid"] == meta["uid"]
    assert respec["metadata"]["creationTimestamp"] == meta["creationTimestamp"]

    call(kube, "DELETE", url)
    _, again = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("a"))
    assert again["metadata"]["uid"] != meta["uid"]
    assert again["metadata"]["generation"] == 1


def test_status_subresource_is_separate(kube, gizmos, namespace):
    url = GIZMOS.format(ns=namespace) + "/s"
    status, created = call(kube, "POST", GIZMOS.format(ns=namespace),
                           {**gizmo("s"), "status": {"phase": "Forged"}})
    assert "status" not in created  # status is written through /status only

    _, written = call(kube, "PUT", url + "/status", {
        **created, "spec": {"model": "ignored"}, "metadata": {**created["metadata"],
                                                           "labels": {"ignored": "yes"}},
        "status": {"phase": "Ready", "replicas": 1}})
    assert written["status"] == {"phase": "Ready", "replicas": 1}
    assert written["spec"] == created["spec"]
    assert "labels" not in written["metadata"]
    assert written["metadata"]["generation"] == 1

    _, replaced = call(kube, "PUT", url, {**written, "spec": {"model": "big"},
                                          "status": {"phase": "Ignored"}})
    assert replaced["status"] == {"phase": "Ready", "replicas": 1}
    assert replaced["spec"]["model"] == "big"
    assert replaced["metadata"]["generation"] == 2

    _, patched = call(kube, "PATCH", url + "/status", {"status": {"phase": "Gone"},
                                                       "spec": {"model": "nope"}},
                      content_type="application/merge-patch+json")
    assert (patched["status"]["phase"], patched["spec"]["model"]) == ("Gone", "big")
    status, fetched = call(kube, "GET", url + "/status")
    assert status == 200 and fetched == patched

    # Built-ins too: a Deployment's status is its controller's to write.
    deployments = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    _, dep = call(kube, "POST", deployments, {"metadata": {"name": "d"}, "spec": {
        "selector": {"matchLabels": {"app": "d"}},
        "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": []}}},
        "status": {"readyReplicas": 5}})
    assert "status" not in dep and dep["spec"]["replicas"] == 1
    _, dep = call(kube, "PATCH", f"{deployments}/d/status", {"status": {"readyReplicas": 1}},
                  content_type="application/strategic-merge-patch+json")
    assert dep["status"] == {"readyReplicas": 1}


def test_conflicts_are_409_and_failed_json_patch_tests_are_422(kube, gizmos, namespace):
    url = GIZMOS.format(ns=namespace) + "/c"
    _, created = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("c"))
    status, duplicate = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("c"))
    assert status == 409
    assert duplicate == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": 'gizmos.test.brim.dev "c" already exists',
                         "reason": "AlreadyExists", "code": 409,
                         "details": {"name": "c", "group": "test.brim.dev", "kind": "gizmos"}}

    _, updated = call(kube, "PUT", url, {**created, "spec": {"model": "v2"}})
    status, stale = call(kube, "PUT", url, {**created, "spec": {"model": "v3"}})
    assert status == 409 and stale["reason"] == "Conflict"
    assert "the object has been modified" in stale["message"]
    status, fresh = call(kube, "PUT", url, {**updated, "spec": {"model": "v3"}})
    assert status == 200 and fresh["spec"]["model"] == "v3"
    unconditional = {**fresh, "metadata": {"name": "c"}}  # custom resources require one
    status, error = call(kube, "PUT", url, unconditional)
    assert status == 422 and "must be specified for an update" in error["message"]

    guarded = [{"op": "test", "path": "/metadata/resourceVersion",
                "value": created["metadata"]["resourceVersion"]},
               {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}]
    status, failed = call(kube, "PATCH", url, guarded, content_type="application/json-patch+json")
    assert status == 422 and failed["reason"] == "Invalid" and failed["kind"] == "Status"
    assert "testing value /metadata/resourceVersion failed" in json.dumps(failed["details"])
    guarded[0]["value"] = fresh["metadata"]["resourceVersion"]
    status, patched = call(kube, "PATCH", url, guarded, content_type="application/json-patch+json")
    assert status == 200 and patched["metadata"]["finalizers"] == ["x/y"]

    status, missing = call(kube, "GET", GIZMOS.format(ns=namespace) + "/nope")
    assert (status, missing["reason"], missing["message"]) == (
        404, "NotFound", 'gizmos.test.brim.dev "nope" not found')


def test_merge_strategic_and_server_side_apply_patches(kube, namespace):
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    call(kube, "POST", url, {"metadata": {"name": "m"}, "data": {"a": "1", "b": "2"}})
    _, merged = call(kube, "PATCH", f"{url}/m", {"data": {"a": None, "c": "3"}},
                     content_type="application/merge-patch+json")
    assert merged["data"] == {"b": "2", "c": "3"}

    apply = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\ndata: {k: v}\n"
    status, error = call(kube, "PATCH", f"{url}/applied", apply,
                         content_type="application/apply-patch+yaml")
    assert status == 400 and "fieldManager is required" in error["message"]
    status, created = call(kube, "PATCH", f"{url}/applied", apply, params={"fieldManager": "brim"},
                           content_type="application/apply-patch+yaml")
    assert status == 201 and created["data"] == {"k": "v"}
    status, reapplied = call(kube, "PATCH", f"{url}/applied", apply.replace("k: v", "k: w"),
                             params={"fieldManager": "brim"},
                             content_type="application/apply-patch+yaml")
    assert status == 200 and reapplied["data"] == {"k": "w"}
    assert [(m["manager"], m["operation"]) for m in reapplied["metadata"]["managedFields"]] == [
        ("brim", "Apply")]


def test_label_and_field_selectors_on_lists(kube, namespace):
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    for name, labels in [("a", {"app": "x", "env": "a"}), ("b", {"app": "x", "tier": "db"}),
                         ("c", {"app": "y", "env": "b"}), ("d", {})]:
        call(kube, "POST", url, {"metadata": {"name": name, "labels": labels}})

    def names(**params):
        status, listing = call(kube, "GET", url, params=params)
        assert status == 200, listing
        return [o["metadata"]["name"] for o in listing["items"]]

    assert names(labelSelector="app=x,tier!=db") == ["a"]
    assert names(labelSelector="env in (a,b)") == ["a", "c"]
    assert names(labelSelector="env notin (a)") == ["b", "c", "d"]
    assert names(labelSelector="!app") == ["d"]
    assert names(labelSelector="app") == ["a", "b", "c"]
    assert names(labelSelector="app==x,env") == ["a"]
    assert names(fieldSelector="metadata.name=c") == ["c"]
    assert names(fieldSelector="metadata.name!=c", labelSelector="app") == ["a", "b"]
    assert call(kube, "GET", url, params={"labelSelector": "app in x"})[0] == 400
    status, error = call(kube, "GET", url, params={"fieldSelector": "data.x=1"})
    assert (status, error["message"]) == (400, "field label not supported: data.x")

    _, page = call(kube, "GET", url, params={"limit": 3})
    assert [o["metadata"]["name"] for o in page["items"]] == ["a", "b", "c"]
    assert page["metadata"]["remainingItemCount"] == 1
    _, rest = call(kube, "GET", url, params={"limit": 3, "continue": page["metadata"]["continue"]})
    assert [o["metadata"]["name"] for o in rest["items"]] == ["d"]
    assert "continue" not in rest["metadata"]


# -- deletion ----------------------------------------------------------------------------------

def _configmap(name: str, *owners: dict, finalizers: tuple[str, ...] = ()) -> dict:
    meta = {"name": name, "ownerReferences": [
        {"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
         "uid": o["metadata"]["uid"]} for o in owners]}
    if finalizers:
        meta["finalizers"] = list(finalizers)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}


def test_owner_references_are_garbage_collected(kube, gizmos, namespace):
    owner = kube.create(gizmo("owner"), namespace)
    other = kube.create(gizmo("other"), namespace)
    kube.create(_configmap("child", owner), namespace)
    kube.create(_configmap("shared", owner, other), namespace)
    kube.create(_configmap("held", owner, finalizers=("test/hold",)), namespace)
    kube.create(_configmap("grandchild", kube.get("cm", "child", namespace)), namespace)

    assert kube.delete("gz", "owner", namespace=namespace) is None
    assert kube.get("cm", "child", namespace) is None
    assert kube.get("cm", "grandchild", namespace) is None  # cascades
    assert kube.get("cm", "shared", namespace) is not None  # another owner remains
    assert kube.get("cm", "held", namespace)["metadata"]["deletionTimestamp"]
    kube.delete("gz", "other", namespace=namespace)
    assert kube.get("cm", "shared", namespace) is None

    # Foreground: the owner waits, marked, until its dependents are gone.
    owner = kube.create(gizmo("fg"), namespace)
    kube.create(_configmap("fg-child", owner, finalizers=("test/hold",)), namespace)
    left = kube.delete("gz", "fg", namespace=namespace, propagation="Foreground")
    assert left["metadata"]["finalizers"] == ["foregroundDeletion"]
    kube.patch("cm", "fg-child", {"metadata": {"finalizers": None}}, namespace=namespace)
    assert kube.get("gz", "fg", namespace) is None

    # Orphan: the dependents stay, without the owner reference.
    owner = kube.create(gizmo("orphaner"), namespace)
    kube.create(_configmap("orphan", owner), namespace)
    kube.delete("gz", "orphaner", namespace=namespace, propagation="Orphan")
    assert "ownerReferences" not in kube.get("cm", "orphan", namespace)["metadata"]


def test_finalizers_hold_deletion_until_removed(kube, namespace):
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    call(kube, "POST", url, {"metadata": {"name": "f", "finalizers": ["a/b", "c/d"]}})
    stream = WatchStream(kube, url, fieldSelector="metadata.name=f")
    assert stream.next()["type"] == "ADDED"
    status, marked = call(kube, "DELETE", f"{url}/f")
    assert status == 200 and marked["metadata"]["deletionTimestamp"]
    assert call(kube, "GET", f"{url}/f")[0] == 200
    assert stream.next()["type"] == "MODIFIED"

    more = {"metadata": {"finalizers": ["a/b", "c/d", "e/f"]}}
    status, error = call(kube, "PATCH", f"{url}/f", more,
                         content_type="application/merge-patch+json")
    assert status == 422 and "no new finalizers can be added" in error["message"]
    call(kube, "PATCH", f"{url}/f", {"metadata": {"finalizers": ["c/d"]}},
         content_type="application/merge-patch+json")
    assert call(kube, "GET", f"{url}/f")[0] == 200
    remove = [{"op": "remove", "path": "/metadata/finalizers"}]
    status, last = call(kube, "PATCH", f"{url}/f", remove,
                        content_type="application/json-patch+json")
    assert status == 200 and "finalizers" not in last["metadata"]
    assert call(kube, "GET", f"{url}/f")[0] == 404
    assert [stream.next()["type"] for _ in range(3)] == ["MODIFIED", "MODIFIED", "DELETED"]
    stream.close()


def test_namespace_deletion_takes_its_contents(kube):
    ns = kube.create_namespace("doomed")
    kube.create(_configmap("plain"), ns)
    kube.create(_configmap("held", finalizers=("test/hold",)), ns)
    status, error = call(kube, "POST", "/api/v1/namespaces/missing/configmaps",
                         {"metadata": {"name": "x"}})
    assert (status, error["message"]) == (404, 'namespaces "missing" not found')

    status, terminating = call(kube, "DELETE", f"/api/v1/namespaces/{ns}")
    assert terminating["status"]["phase"] == "Terminating"
    assert kube.get("cm", "plain", ns) is None
    assert kube.get("cm", "held", ns)["metadata"]["deletionTimestamp"]
    status, error = call(kube, "POST", f"/api/v1/namespaces/{ns}/configmaps",
                         {"metadata": {"name": "late"}})
    assert status == 403 and error["reason"] == "Forbidden"
    kube.patch("cm", "held", {"metadata": {"finalizers": []}}, namespace=ns)
    assert kube.get("namespaces", ns) is None


# -- admission, faults, audit ------------------------------------------------------------------

def test_validator_hook_rejects_with_422(kube, gizmos, namespace):
    seen = []

    def validate(obj, old):
        seen.append((obj["spec"].get("replicas"), old and old["spec"].get("replicas")))
        if obj["spec"].get("replicas", 0) < 0:
            return [f"spec.replicas: Invalid value: {obj['spec']['replicas']}: must be greater "
                    "than or equal to 0", "spec.model: Required value"]
        return []

    remove = kube.add_validator("gizmos.test.brim.dev", validate)
    status, error = call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("v", replicas=-1))
    assert status == 422
    assert error["reason"] == "Invalid"
    assert error["message"] == ('Gizmo.test.brim.dev "v" is invalid: [spec.replicas: Invalid '
                                'value: -1: must be greater than or equal to 0, spec.model: '
                                'Required value]')
    assert error["details"]["causes"][0] == {
        "reason": "FieldValueInvalid", "field": "spec.replicas",
        "message": "Invalid value: -1: must be greater than or equal to 0"}
    assert kube.get("gz", "v", namespace) is None

    assert call(kube, "POST", GIZMOS.format(ns=namespace), gizmo("v", replicas=2))[0] == 201
    status, _ = call(kube, "PATCH", GIZMOS.format(ns=namespace) + "/v/scale",
                     {"spec": {"replicas": -5}}, content_type="application/merge-patch+json")
    assert status == 422
    status, _ = call(kube, "PATCH", GIZMOS.format(ns=namespace) + "/v", {"spec": {"replicas": -3}},
                     content_type="application/merge-patch+json")
    assert status == 422
    assert kube.get("gz", "v", namespace)["spec"]["replicas"] == 2
    assert seen == [(-1, None), (2, None), (-3, 2)]  # the scale write failed before admission
    remove()
    assert call(kube, "PATCH", GIZMOS.format(ns=namespace) + "/v", {"spec": {"replicas": -3}},
                content_type="application/merge-patch+json")[0] == 200


def test_fault_injection(kube, gizmos, namespace):
    url = f"/api/v1/namespaces/{namespace}/configmaps"
    call(kube, "POST", url, {"metadata": {"name": "x"}})
    call(kube, "POST", url, {"metadata": {"name": "y"}})

    kube.fail("get", "configmaps", name="x", code=503, times=2)
    status, error = call(kube, "GET", f"{url}/x")
    assert (status, error["kind"], error["reason"], error["code"]) == (
        503, "Status", "ServiceUnavailable", 503)
    assert call(kube, "GET", f"{url}/y")[0] == 200  # another name is unaffected
    assert call(kube, "GET", f"{url}/x")[0] == 503
    assert call(kube, "GET", f"{url}/x")[0] == 200  # exhausted

    kube.create(gizmo("z"), namespace)
    kube.fail("patch", "gz", code=409, subresource="status")
    merge = "application/merge-patch+json"
    assert call(kube, "PATCH", GIZMOS.format(ns=namespace) + "/z", {"spec": {"model": "m"}},
                content_type=merge)[0] == 200
    status, error = call(kube, "PATCH", GIZMOS.format(ns=namespace) + "/z/status",
                         {"status": {"phase": "x"}}, content_type=merge)
    assert (status, error["reason"]) == (409, "Conflict")
    assert "status" not in kube.get("gz", "z", namespace)  # the failed request changed nothing

    kube.fail("*", "configmaps", code=500)
    assert call(kube, "GET", url)[0] == 500

    kube.hang("list", "configmaps", seconds=1.5)
    with pytest.raises(socket.timeout):
        call(kube, "GET", url, timeout=0.3)
    assert call(kube, "GET", url)[0] == 200
    assert kube.faults.pending() == []
    codes = [e.code for e in kube.audit if e.resource == "configmaps" and e.verb == "list"]
    assert codes[:1] == [500]


def test_audit_log_records_rbac_verbs(kube, gizmos, namespace):
    kube.audit.clear()
    base = GIZMOS.format(ns=namespace)
    merge = "application/merge-patch+json"
    call(kube, "POST", base, gizmo("a"))
    _, obj = call(kube, "GET", f"{base}/a")
    call(kube, "GET", base)
    call(kube, "GET", "/apis/test.brim.dev/v1/gizmos")  # all namespaces
    call(kube, "PUT", f"{base}/a", obj)
    call(kube, "PATCH", f"{base}/a", {"spec": {"model": "m"}}, content_type=merge)
    call(kube, "PATCH", f"{base}/a/status", {"status": {"phase": "p"}}, content_type=merge)
    call(kube, "GET", f"{base}/a/scale")
    call(kube, "PATCH", f"{base}/a/scale", {"spec": {"replicas": 2}}, content_type=merge)
    WatchStream(kube, base).close()
    call(kube, "DELETE", f"{base}/a")
    call(kube, "DELETE", base)
    call(kube, "GET", "/apis")  # discovery is not a resource request
    group = "test.brim.dev"
    assert kube.audit.keys() == [
        ("create", group, "gizmos", None, namespace),
        ("get", group, "gizmos", None, namespace),
        ("list", group, "gizmos", None, namespace),
        ("list", group, "gizmos", None, None),
        ("update", group, "gizmos", None, namespace),
        ("patch", group, "gizmos", None, namespace),
        ("patch", group, "gizmos", "status", namespace),
        ("get", group, "gizmos", "scale", namespace),
        ("patch", group, "gizmos", "scale", namespace),
        ("watch", group, "gizmos", None, namespace),
        ("delete", group, "gizmos", None, namespace),
        ("deletecollection", group, "gizmos", None, namespace),
    ]
    assert ("test.brim.dev", "gizmos/status", "patch") in kube.audit.permissions()
    assert [e.code for e in kube.audit] == [201, 200, 200, 200, 200, 200, 200, 200, 200, 200,
                                            200, 200]


# -- discovery, CRDs, clients ------------------------------------------------------------------

def test_discovery_follows_crds(kube, namespace):
    status, core = call(kube, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    status, namespaces = call(kube, "GET", "/api/v1/namespaces")
    assert (status, namespaces["kind"], namespaces["apiVersion"]) == (200, "NamespaceList", "v1")
    assert "kind" not in namespaces["items"][0]  # as the apiserver lists built-ins

    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "clusterthings.temp.brim.dev"},
           "spec": {"group": "temp.brim.dev", "scope": "Cluster",
                    "names": {"plural": "clusterthings", "kind": "ClusterThing",
                              "shortNames": ["ct"], "categories": ["brim"]},
                    "versions": [
                        {"name": "v1beta1", "served": True, "storage": False},
                        {"name": "v1", "served": True, "storage": True,
                         "subresources": {"status": {}}}]}}
    status, _ = call(kube, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                     {**crd, "metadata": {"name": "wrong.name"}})
    assert status == 422
    status, created = call(kube, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                           crd)
    assert status == 201
    assert {c["type"] for c in created["status"]["conditions"]} == {"NamesAccepted",
                                                                    "Established"}
    _, group = call(kube, "GET", "/apis/temp.brim.dev")
    assert group["preferredVersion"]["version"] == "v1"
    _, resources = call(kube, "GET", "/apis/temp.brim.dev/v1")
    assert {r["name"]: (r["namespaced"], r.get("shortNames")) for r in resources["resources"]} == {
        "clusterthings": (False, ["ct"]), "clusterthings/status": (False, None)}

    apis = kubernetes.client.ApisApi(api_client(kube)).get_api_versions()
    assert "temp.brim.dev" in {g.name for g in apis.groups}
    custom = kubernetes.client.CustomObjectsApi(api_client(kube))
    custom.create_cluster_custom_object("temp.brim.dev", "v1", "clusterthings",
                                        {"apiVersion": "temp.brim.dev/v1", "kind": "ClusterThing",
                                         "metadata": {"name": "one"}})
    old = custom.get_cluster_custom_object("temp.brim.dev", "v1beta1", "clusterthings", "one")
    assert old["apiVersion"] == "temp.brim.dev/v1beta1"  # one storage, served at each version
    assert call(kube, "GET", "/apis/temp.brim.dev/v1/namespaces/default/clusterthings")[0] == 404

    kube.delete("crd", "clusterthings.temp.brim.dev")
    assert kube.get("crd", "clusterthings.temp.brim.dev") is None
    assert call(kube, "GET", "/apis/temp.brim.dev/v1")[0] == 404
    assert call(kube, "GET", "/apis/temp.brim.dev/v1/clusterthings")[0] == 404


def test_kubernetes_client_and_scale(kube, gizmos, namespace):
    client = api_client(kube)
    core, apps = kubernetes.client.CoreV1Api(client), kubernetes.client.AppsV1Api(client)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s"},
                                              "stringData": {"token": "hf_x"}})
    assert core.read_namespaced_secret("s", namespace).data == {"token": "aGZfeA=="}
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    scale = apps.read_namespaced_deployment_scale("web", namespace)
    assert (scale.spec.replicas, scale.status.selector) == (2, "app=web")
    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 4}})
    assert apps.read_namespaced_deployment("web", namespace).spec.replicas == 4
    with pytest.raises(kubernetes.client.ApiException) as raised:
        core.read_namespaced_config_map("missing", namespace)
    assert raised.value.status == 404

    kube.create(gizmo("g", replicas=2), namespace)
    kube.set_status("gz", "g", {"replicas": 1, "selector": "app=g"}, namespace=namespace)
    status, scale = call(kube, "GET", GIZMOS.format(ns=namespace) + "/g/scale")
    assert (scale["kind"], scale["apiVersion"], scale["spec"], scale["status"]) == (
        "Scale", "autoscaling/v1", {"replicas": 2}, {"replicas": 1, "selector": "app=g"})


def test_playing_the_kubelet(kube, namespace):
    deployment = kube.create({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "runtime"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "brim"}},
                 "template": {"metadata": {"labels": {"app": "brim", "role": "runtime"}},
                              "spec": {"containers": [{"name": "brim", "image": "brim"}]}}}},
        namespace)
    stream = WatchStream(kube, f"/api/v1/namespaces/{namespace}/pods", labelSelector="app=brim",
                         resourceVersion=deployment["metadata"]["resourceVersion"])
    pods = kube.rollout("runtime", namespace)
    assert len(pods) == 2
    assert all(p["metadata"]["labels"] == {"app": "brim", "role": "runtime"} for p in pods)
    assert all(p["status"]["phase"] == "Running" for p in pods)
    assert [e["type"] for e in [stream.next() for _ in range(4)]] == [
        "ADDED", "MODIFIED", "ADDED", "MODIFIED"]
    stream.close()
    status = kube.get("deploy", "runtime", namespace)["status"]
    assert (status["readyReplicas"], status["observedGeneration"]) == (2, 1)

    kube.set_pod_log(namespace, pods[0]["metadata"]["name"], "KV cache: 1024 blocks\n")
    status, log = call(kube, "GET", f"/api/v1/namespaces/{namespace}/pods/"
                                    f"{pods[0]['metadata']['name']}/log")
    assert (status, log) == (200, "KV cache: 1024 blocks\n")

    kube.delete("deployments.apps", "runtime", namespace=namespace)
    assert kube.list("pods", namespace) == []  # owned by the Deployment, collected with it


def test_reset_keeps_crds_and_system_namespaces(kube, gizmos):
    ns = kube.create_namespace("reset")
    kube.create(gizmo("r"), ns)
    kube.add_validator("gz", lambda obj, old: ["never"])
    kube.reset()
    assert kube.get("namespaces", ns) is None
    assert {n["metadata"]["name"] for n in kube.list("namespaces")} == {
        "default", "kube-system", "kube-public", "kube-node-lease"}
    assert kube.get("crd", "gizmos.test.brim.dev") is not None
    assert call(kube, "POST", GIZMOS.format(ns="default"), gizmo("after"))[0] == 201
    kube.delete("gz", "after", namespace="default")
