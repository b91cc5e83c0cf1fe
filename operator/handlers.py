"""kopf handlers: thin, each hands one ModelDeployment to `reconcile`.

    modeldeployment_changed   created, edited, or found at start-up
    modeldeployment_resync    every resync_seconds (restores children, retries refused plans)
    child_event               a Deployment, Service or PodDisruptionBudget of ours changed or
                              went away: reconcile its owner now, not at the next resync
    runtime_pod_event         a runtime pod measured its memory (HTTP report when serving, a
                              termination message when it could not fit)
    facts_job_event           a pvc:// model's inspect Job finished

Handlers are added to a given registry (`register`), never to a module-level one, so that a
test can run the operator more than once in a process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import kopf

from brim.operator import reconcile as rc
from brim.operator.children import COMPONENT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, \
    MODEL_DEPLOYMENT_LABEL
from brim.operator.kube import Kube, KubeError, load_configuration
from brim.operator.settings import OperatorSettings
from brim.operator.spec import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

ANNOTATION_PREFIX = "brim.dev"


def _post_event(resource: dict, type: str, reason: str, message: str) -> None:
    try:
        kopf.event(resource, type=type, reason=reason, message=message[:1024])
    except Exception:  # an Event is a courtesy: never fail a reconciliation for it
        logger.debug("could not post event %s", reason, exc_info=True)


def connection_info(config) -> kopf.ConnectionInfo:
    """kopf's credentials from a kubernetes client Configuration."""
    header = config.get_api_key_with_prefix("BearerToken") or \
        config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        username=config.username or None, password=config.password or None,
        scheme=scheme or None, token=token or None, certificate_path=config.cert_file,
        private_key_path=config.key_file)


def _run(ctx: rc.Context, namespace: str, name: str) -> None:
    """Reconcile; API trouble worth retrying becomes kopf's TemporaryError (with backoff)."""
    try:
        rc.reconcile(ctx, namespace, name)
    except KubeError as exc:
        if exc.is_transient:
            raise kopf.TemporaryError(str(exc), delay=5) from None
        raise


def _run_owner(ctx: rc.Context, namespace: str, labels: dict) -> None:
    """Reconcile the ModelDeployment a child belongs to; failures wait for the resync."""
    name = (labels or {}).get(MODEL_DEPLOYMENT_LABEL)
    if not name:
        return
    try:
        rc.reconcile(ctx, namespace, name)
    except KubeError as exc:
        logger.info("%s/%s: reconciling after a child event: %s; the resync retries",
                    namespace, name, exc)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings, *,
             kube_factory: Callable[[], Kube] = Kube.from_environment,
             hub_facts: Callable | None = None) -> None:
    """Add brim's handlers to `registry`."""
    md = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    ours = {MANAGED_BY_LABEL: MANAGED_BY}

    @kopf.on.login(registry=registry)
    def operator_login(**_) -> kopf.ConnectionInfo:
        # The same credentials as our own API calls: the pod's service account, else the
        # kubeconfig, resolved by the kubernetes client.
        return connection_info(load_configuration())

    @kopf.on.startup(registry=registry)
    def operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
        # Progress and the last-handled spec go in annotations: the CRD's status schema is
        # brim's own (a structural schema would prune kopf's status fields).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
        settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
        settings.posting.level = logging.INFO
        memo.ctx = rc.Context(kube=kube_factory(), settings=operator_settings,
                              events=_post_event, hub_facts=hub_facts)

    operator_settings = settings

    @kopf.on.resume(**md)
    @kopf.on.create(**md)
    @kopf.on.update(**md)
    def modeldeployment_changed(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
        _run(memo.ctx, namespace, name)

    @kopf.timer(**md, interval=settings.resync_seconds, initial_delay=settings.resync_seconds)
    def modeldeployment_resync(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
        _run(memo.ctx, namespace, name)

    for group, version, plural in (("apps", "v1", "deployments"), ("", "v1", "services"),
                                   ("policy", "v1", "poddisruptionbudgets")):
        @kopf.on.event(group, version, plural, labels=ours, registry=registry,
                       id=f"child_event/{plural}")
        def child_event(type: str | None, body: kopf.Body, namespace: str, labels: dict,
                        memo: kopf.Memo, **_) -> None:
            if type is None:  # the initial listing: the resume handler covers it
                return
            if type == "DELETED" or body.get("kind") == "Deployment":
                _run_owner(memo.ctx, namespace, labels)

    @kopf.on.event("", "v1", "pods", labels={**ours, COMPONENT_LABEL: "runtime"},
                   registry=registry)
    def runtime_pod_event(body: kopf.Body, namespace: str, labels: dict, memo: kopf.Memo,
                          **_) -> None:
        if rc.observe_pod(memo.ctx, dict(body)):
            _run_owner(memo.ctx, namespace, labels)

    @kopf.on.event("batch", "v1", "jobs", labels={**ours, COMPONENT_LABEL: "facts"},
                   registry=registry)
    def facts_job_event(type: str | None, body: kopf.Body, namespace: str, labels: dict,
                        memo: kopf.Memo, **_) -> None:
        status = body.get("status") or {}
        if type and (status.get("succeeded") or status.get("failed")):
            _run_owner(memo.ctx, namespace, labels)
