"""The few Kubernetes API calls the operator makes, by path, as plain dicts.

Built on the `kubernetes` client's ApiClient, which resolves the credentials (in-cluster
service account, then KUBECONFIG) and refreshes tokens. Every failure is a `KubeError` with
the HTTP status; `is_transient` says which are worth retrying (conflicts, throttling,
server errors, timeouts).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlencode

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class KubeError(Exception):
    """An API call that failed; status 0 when no HTTP answer came (connection, timeout)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status or 'no answer'} {reason}: {message}".strip())
        self.status = status
        self.reason = reason

    @property
    def is_transient(self) -> bool:
        return self.status == 0 or self.status in TRANSIENT_STATUSES


def path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """/api/v1/namespaces/ns/pods/name/status and the like."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts += ["namespaces", namespace]
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def load_configuration():
    """Make the kubernetes client's default configuration the pod's service account, or else
    the kubeconfig that $KUBECONFIG names now (the client reads the variable only once, at
    import), or ~/.kube/config; return a copy of it."""
    import os

    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or "~/.kube/config")
    return kubernetes.client.Configuration.get_default_copy()


class Kube:
    """Synchronous API calls (kopf runs sync handlers in its thread pool).

    timeout: seconds per call; a call that takes longer is a transient KubeError.
    """

    def __init__(self, api_client, timeout: float = 10.0) -> None:
        self.api_client = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls, timeout: float = 10.0) -> "Kube":
        """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
        import kubernetes

        load_configuration()
        return cls(kubernetes.client.ApiClient(), timeout)

    def _call(self, method: str, url: str, body=None, content_type: str | None = None,
              query: dict | None = None, timeout: float | None = None):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        if query:
            url = f"{url}?{urlencode(query)}"
        client = self.api_client
        try:
            method, full_url, headers, body, post = client.param_serialize(
                method=method, resource_path=url, header_params=headers, body=body,
                auth_settings=["BearerToken"])
            response = client.call_api(method, full_url, headers, body, post,
                                       _request_timeout=timeout or self.timeout)
            response.read()
        except KubeError:
            raise
        except Exception as exc:  # connection refused, timeouts, TLS: no HTTP answer
            raise KubeError(0, f"{method} {url}: {exc!r}") from None
        if response.status >= 400:
            try:
                status = json.loads(response.data)
                message, reason = status.get("message", ""), status.get("reason", "")
            except ValueError:
                message, reason = response.data.decode(errors="replace")[:500], ""
            raise KubeError(response.status, f"{method} {url}: {message}", reason)
        return json.loads(response.data) if response.data else None

    def get(self, url: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", url)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, url: str, label_selector: str | None = None) -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        return (self._call("GET", url, query=query) or {}).get("items") or []

    def create(self, url: str, obj: dict) -> dict:
        return self._call("POST", url, body=obj)

    def patch(self, url: str, patch: dict, content_type: str = MERGE_PATCH) -> dict:
        return self._call("PATCH", url, body=patch, content_type=content_type)

    def delete(self, url: str, propagation: str = "Background") -> None:
        try:
            self._call("DELETE", url, body={"apiVersion": "v1", "kind": "DeleteOptions",
                                            "propagationPolicy": propagation})
        except KubeError as exc:
            if exc.status != 404:
                raise

    def has_resource(self, api_version: str, plural: str) -> bool:
        """Whether the API serves this resource (discovery), e.g. ServiceMonitors."""
        try:
            found = self._call("GET", "/apis/" + api_version)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])

    def pod_log_tail(self, namespace: str, pod: str, lines: int = 20) -> str:
        try:
            client = self.api_client
            url = path("v1", "pods", namespace, pod, "log") + f"?tailLines={lines}"
            method, full_url, headers, body, post = client.param_serialize(
                method="GET", resource_path=url, auth_settings=["BearerToken"])
            response = client.call_api(method, full_url, headers, body, post,
                                       _request_timeout=self.timeout)
            response.read()
            return response.data.decode(errors="replace") if response.status < 400 else ""
        except Exception:  # a log is a courtesy in an error message, never a failure
            return ""
