"""HTTP: the REST protocol over a `Store`, served by aiohttp. It routes URLs to resource requests
(named by RBAC verb), answers with JSON objects, lists and Tables, streams watches, records every
resource request in the audit log and answers injected faults."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from typing import Any

import yaml
from aiohttp import web

from tests.operator.emulator.audit import AuditEntry, AuditLog, Faults
from tests.operator.emulator.discovery import SERVER_VERSION, discovery, root_paths
from tests.operator.emulator.errors import ApiError, bad_request
from tests.operator.emulator.patches import JsonPatchError, json_patch, merge_patch
from tests.operator.emulator.resources import ResourceType, _present
from tests.operator.emulator.selectors import FieldSelector, LabelSelector
from tests.operator.emulator.store import Store
from tests.operator.emulator.tables import table
from tests.operator.emulator.watch import Watcher, _shown

logger = logging.getLogger(__name__)

_PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


@dataclasses.dataclass
class ResourceRequest:
    """A request for a resource, parsed from its URL as the apiserver's RequestInfo is."""

    rtype: ResourceType
    verb: str
    namespace: str | None
    name: str | None
    subresource: str | None
    audit: AuditEntry | None = None  # where the response's code is recorded


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _error_response(error: ApiError) -> web.Response:
    response = _json_response(error.status(), error.code)
    if error.code == 429:
        response.headers["Retry-After"] = "1"
    return response


class ApiServer:
    """The REST protocol over a Store: routing, verbs, discovery, Tables, watch streams, faults
    and the audit log. Runs in one asyncio loop; store calls are synchronous and brief."""

    def __init__(self, store: Store, audit: AuditLog, faults: Faults):
        self.store = store
        self.audit = audit
        self.faults = faults
        self.pod_logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> log text
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None
        self._stopping: asyncio.Event | None = None

    async def start(self) -> int:
        self._stopping = asyncio.Event()
        # handler_cancellation: a watch whose client went away ends instead of lingering.
        server = web.Server(self.handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        self.store.close_watches()
        await self._runner.cleanup()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            parts = [p for p in request.path.split("/") if p]
            if parts[:1] in (["api"], ["apis"]):
                return await self._api(request, parts)
            return self._non_resource(parts)
        except ApiError as error:
            return _error_response(error)
        except Exception as error:  # a bug here, or in a test's validator: tell the client
            logger.exception("the emulated apiserver failed on %s %s", request.method,
                             request.path_qs)
            return _error_response(ApiError(500, f"Internal error: {error!r}"))

    # -- discovery and other non-resource URLs --------------------------------------------------

    def _non_resource(self, parts: list[str]) -> web.Response:
        if not parts:
            return _json_response(root_paths(self.store.types()))
        if parts == ["version"]:
            return _json_response(SERVER_VERSION)
        if parts[0] in ("healthz", "livez", "readyz"):
            return web.Response(text="ok")
        # Everything else, /openapi/v2 and /openapi/v3 included, is absent: kubectl then does
        # without OpenAPI (that is why it needs --validate=false).
        raise ApiError(404, "the server could not find the requested resource", details={})

    # -- resources ------------------------------------------------------------------------------

    def _parse(self, request: web.BaseRequest, parts: list[str]) -> ResourceRequest | None:
        """The resource request a URL names, or None for a discovery URL."""
        if parts[0] == "api":
            if len(parts) <= 2:
                return None
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) <= 3:
                return None
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        # /namespaces/{ns}/{resource}... unless it is the namespace's own /status or /finalize.
        if rest[0] == "namespaces" and len(rest) >= 3 and not (
                len(rest) == 3 and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "the server could not find the requested resource", details={})
        plural, name, subresource = (rest + [None, None])[:3]
        rtype = self.store.lookup(group, version, plural)
        if rtype is None or (namespace is not None and not rtype.namespaced) or (
                rtype.namespaced and name is not None and namespace is None) or (
                subresource is not None and subresource not in rtype.subresources):
            raise ApiError(404, "the server could not find the requested resource", details={})
        method = request.method
        watch = request.query.get("watch") in ("true", "1")
        verb = {
            "GET": "get" if name else ("watch" if watch else "list"),
            "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method)
        if verb is None or (verb in ("create",) and name is not None) or (
                verb in ("update", "patch") and name is None):
            raise ApiError(405, "the server does not allow this method on the requested "
                                "resource", details={})
        return ResourceRequest(rtype, verb, namespace, name, subresource)

    async def _api(self, request: web.BaseRequest, parts: list[str]) -> web.StreamResponse:
        parsed = self._parse(request, parts)
        if parsed is None:
            return _json_response(discovery(self.store.types(), parts, self.port))
        entry = parsed.audit = AuditEntry(parsed.verb, parsed.rtype.group, parsed.rtype.plural,
                                          parsed.subresource, parsed.namespace, parsed.name)
        self.audit.append(entry)
        fault = self.faults.take(entry)
        try:
            if fault is not None and fault.hang:
                try:
                    await asyncio.wait_for(self._stopping.wait(), fault.hang)
                except TimeoutError:
                    pass
                raise ApiError(504, "Timeout: request did not complete within requested timeout"
                                    " - context deadline exceeded", details={})
            if fault is not None:
                raise fault.error()
            response = await self._serve(request, parsed)
        except ApiError as error:
            response = _error_response(error)
        except Exception as error:
            logger.exception("the emulated apiserver failed on %s %s", request.method,
                             request.path_qs)
            response = _error_response(ApiError(500, f"Internal error: {error!r}"))
        entry.code = response.status
        return response

    async def _serve(self, request: web.BaseRequest, req: ResourceRequest) -> web.StreamResponse:
        query = request.query
        rtype, namespace, name, sub = req.rtype, req.namespace, req.name, req.subresource
        as_table = "as=Table" in request.headers.get("Accept", "")
        dry_run = query.get("dryRun") == "All"
        manager = query.get("fieldManager")
        if req.verb == "watch":
            return await self._watch(request, req)
        if req.verb == "list":
            return self._list(request, req)
        if req.verb == "get":
            if sub == "scale":
                return _json_response(self.store.get_scale(rtype, namespace, name))
            if sub == "log":
                self.store.get(rtype, namespace, name)
                return web.Response(text=self.pod_logs.get((namespace, name), ""))
            obj = _present(rtype, self.store.get(rtype, namespace, name))
            if as_table:
                return _json_response(table(rtype, [obj], include_object=query.get(
                    "includeObject", "Metadata")))
            return _json_response(obj)
        if req.verb == "deletecollection":
            labels = LabelSelector.parse(query.get("labelSelector"))
            fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
            options = await self._body(request, optional=True) or {}
            items, _ = self.store.list(rtype, namespace, labels, fields)
            deleted = []
            for obj in items:
                meta = obj["metadata"]
                try:
                    deleted.append(self.store.delete(
                        rtype, meta.get("namespace"), meta["name"], dry_run=dry_run,
                        propagation=query.get("propagationPolicy",
                                              options.get("propagationPolicy"))))
                except ApiError as error:
                    if error.code != 404:  # deleted meanwhile: fine
                        raise
            return _json_response(self._list_body(rtype, [_present(rtype, o) for o in deleted],
                                                  self.store.resource_version))
        if req.verb == "delete":
            options = await self._body(request, optional=True) or {}
            obj = self.store.delete(
                rtype, namespace, name, dry_run=dry_run,
                propagation=query.get("propagationPolicy", options.get("propagationPolicy")),
                preconditions=options.get("preconditions"))
            return _json_response(_present(rtype, obj))
        body = await self._body(request, yaml_ok=True)
        if req.verb == "create":
            obj = self.store.create(rtype, namespace, body, dry_run=dry_run, field_manager=manager)
            return _json_response(_present(rtype, obj), 201)
        if req.verb == "update":
            if sub == "scale":
                return _json_response(self.store.update_scale(rtype, namespace, name, body,
                                                              dry_run=dry_run))
            obj = self.store.update(rtype, namespace, name, body, subresource=sub,
                                    dry_run=dry_run, field_manager=manager)
            return _json_response(_present(rtype, obj))
        # patch
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        patch_type = _PATCH_TYPES.get(content_type)
        if patch_type is None:
            raise ApiError(415, f"the body of the request was in an unknown format - accepted "
                                f"media types include: {', '.join(_PATCH_TYPES)}")
        if sub == "scale":
            with self.store.lock:
                current = self.store.get_scale(rtype, namespace, name)
                if patch_type == "json":
                    try:
                        scale = json_patch(current, body)
                    except JsonPatchError as e:
                        raise ApiError(422, str(e))
                else:
                    scale = merge_patch(current, body)
                return _json_response(self.store.update_scale(rtype, namespace, name, scale,
                                                              dry_run=dry_run))
        obj, created = self.store.patch(rtype, namespace, name, patch_type, body, subresource=sub,
                                        dry_run=dry_run, field_manager=manager)
        return _json_response(_present(rtype, obj), 201 if created else 200)

    async def _body(self, request: web.BaseRequest, *, optional: bool = False,
                    yaml_ok: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return None
            raise bad_request("the body of the request was empty")
        content_type = request.headers.get("Content-Type", "")
        if "protobuf" in content_type or "cbor" in content_type:
            # Decoding these needs the Go types' schemas. kubectl's imperative generators
            # (`kubectl create namespace|configmap|deployment ...`) send protobuf and fail here;
            # `kubectl apply|create -f` send JSON.
            raise ApiError(415, "the body of the request was in an unknown format - accepted "
                                "media types include: application/json, application/yaml",
                           details={})
        try:
            if yaml_ok and "yaml" in content_type:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except ValueError as e:  # JSONDecodeError and YAMLError's siblings
            raise bad_request(f"the body of the request could not be decoded: {e}")
        except yaml.YAMLError as e:
            raise bad_request(f"the body of the request could not be decoded: {e}")

    def _list_body(self, rtype: ResourceType, items: list[dict], rv: int,
                   cont: str = "", remaining: int | None = None) -> dict:
        metadata: dict = {"resourceVersion": str(rv)}
        if cont:
            metadata["continue"] = cont
            metadata["remainingItemCount"] = remaining
        if not rtype.is_custom:
            # The apiserver leaves kind and apiVersion out of a built-in list's items.
            items = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")}
                     for item in items]
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                "metadata": metadata, "items": items}

    def _list(self, request: web.BaseRequest, req: ResourceRequest) -> web.Response:
        query, rtype = request.query, req.rtype
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
        items, rv = self.store.list(rtype, req.namespace, labels, fields)
        # Pagination: the continue token carries the last key served. Unlike etcd, later pages
        # are read from the current state, not from a snapshot at the first page's version.
        if query.get("continue"):
            try:
                after = json.loads(base64.urlsafe_b64decode(query["continue"]))
            except ValueError:
                raise bad_request("continue key is not valid")
            rv = after["rv"]
            items = [o for o in items
                     if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after["key"]]
        limit = int(query.get("limit") or 0)
        cont, remaining = "", None
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            cont = base64.urlsafe_b64encode(json.dumps(
                {"rv": rv, "key": [last.get("namespace", ""), last["name"]]}).encode()).decode()
            remaining = len(items) - limit
            items = items[:limit]
        items = [_present(rtype, o) for o in items]
        if "as=Table" in request.headers.get("Accept", ""):
            metadata = {"resourceVersion": str(rv), **({"continue": cont} if cont else {})}
            return _json_response(table(rtype, items, metadata=metadata,
                                        include_object=query.get("includeObject", "Metadata")))
        return _json_response(self._list_body(rtype, items, rv, cont, remaining))

    async def _watch(self, request: web.BaseRequest, req: ResourceRequest) -> web.StreamResponse:
        """A watch stream: one JSON event per line, chunked, until timeoutSeconds or the client
        goes. Objects that move into the selectors arrive as ADDED, out of them as DELETED."""
        query, rtype = request.query, req.rtype
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(rtype, query.get("fieldSelector"))
        if req.name:  # the legacy single-object watch: GET .../name?watch=true
            fields.requirements.append(("metadata.name", True, req.name))
        as_table = "as=Table" in request.headers.get("Accept", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        initial_events = query.get("sendInitialEvents") == "true"
        # As in the apiserver, no timeout (or 0) means a long one; here: until the client goes.
        timeout = float(query.get("timeoutSeconds") or 0) or None

        def matches(obj: dict | None) -> bool:
            return obj is not None and (
                req.namespace is None or obj["metadata"].get("namespace") == req.namespace
            ) and labels.matches(obj["metadata"].get("labels")) and fields.matches(obj)

        loop = asyncio.get_running_loop()
        watcher = Watcher(rtype.key, loop, asyncio.Queue())
        expired = None
        try:
            replay, last_rv = self.store.watch(watcher, query.get("resourceVersion"))
        except ApiError as error:
            if error.code != 410:
                raise
            replay, last_rv, expired = [], 0, error
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        first_table = True

        async def send(type_: str, obj: dict) -> None:
            nonlocal first_table
            if as_table and type_ in ("ADDED", "MODIFIED", "DELETED"):
                obj = table(rtype, [obj], headers=first_table)
                first_table = False
            await response.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        def bookmark(rv: int, *, initial_end: bool = False) -> dict:
            meta: dict = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}

        try:
            await response.prepare(request)
            req.audit.code = response.status
            if expired is not None:
                await send("ERROR", expired.status())  # the apiserver streams a 410 as an event
                return response
            for event in replay:
                if shown := _shown(event, matches):
                    await send(shown[0], _present(rtype, shown[1]))
            if initial_events:
                await send("BOOKMARK", bookmark(last_rv, initial_end=True))
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:  # the server is stopping
                    break
                # Every event taken counts, shown or not: a bookmark promises that nothing up to
                # its resourceVersion is still to come.
                last_rv = event.resource_version
                if shown := _shown(event, matches):
                    await send(shown[0], _present(rtype, shown[1]))
            if bookmarks:  # a last bookmark, so that the client resumes from here
                await send("BOOKMARK", bookmark(last_rv))
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-write: nothing to tell it
            pass
        finally:
            self.store.unwatch(watcher)
        return response
