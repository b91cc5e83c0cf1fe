"""Bring one ModelDeployment's world in line with its spec: the operator's bottom half.

    read the resource -> parse the spec -> (re)plan when needed -> apply the children
    -> compute the status from what is now true -> write it

Planning happens when the spec changed (generation), when the last plan did not fit (GPUs may
have appeared since), or when a pod measured more memory than planned. Otherwise the children
are rebuilt from `status.plan`, so a resync or an operator restart changes nothing.

A spec that fits nowhere launches nothing; an edit that no longer fits leaves the running
Deployment as it is. A pod that could not fit the KV cache it was planned for leaves its
memory report; the plan is made again with what it measured (auto lengths shrink), or, for
an explicit maxModelLen that cannot fit, the Deployment is scaled to zero instead of
crash-looping.

Every call here is idempotent; concurrent calls for one resource are serialised.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from brim.runtime.planner.facts import CheckpointFacts, decode_facts
from brim.runtime.planner.report import MemoryReport

from brim.operator import children as ch
from brim.operator import status as st
from brim.operator.facts import (FactsCache, FactsError, FactsPending, bundled_facts,
                                 inline_facts)
from brim.operator.inventory import gpu_classes
from brim.operator.kube import Kube, KubeError, path
from brim.operator.planning import decide
from brim.operator.settings import OperatorSettings
from brim.operator.spec import GROUP, PLURAL, VERSION, DeploymentSpec, SpecError, parse_spec

logger = logging.getLogger(__name__)

API_VERSION = f"{GROUP}/{VERSION}"


EventFn = Callable[[dict, str, str, str], None]  # (resource, type, reason, message)


@dataclass
class Context:
    """What every reconciliation shares: the API, the settings, caches and per-resource locks.

    events: posts a Kubernetes Event about a resource (kopf's event poster in the operator).
    hub_facts: reads an hf:// model's facts (brim.operator.hub.hub_facts).
    """

    kube: Kube
    settings: OperatorSettings
    events: EventFn = lambda *_: None
    hub_facts: Callable | None = None
    facts_cache: FactsCache = field(default_factory=FactsCache)
    _locks: dict = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    _recorded_starts: set = field(default_factory=set)
    _monitoring: tuple[float, bool] = (0.0, False)

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def has_service_monitors(self) -> bool:
        """Whether prometheus-operator's API exists (asked at most once a minute)."""
        checked_at, present = self._monitoring
        if time.monotonic() - checked_at > 60:
            try:
                present = self.kube.has_resource("monitoring.coreos.com/v1", "servicemonitors")
            except KubeError:
                present = False
            self._monitoring = (time.monotonic(), present)
        return present


def md_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return path(API_VERSION, PLURAL, namespace, name, subresource)


# -- facts -------------------------------------------------------------------------------------


def load_facts(ctx: Context, md: dict, spec: DeploymentSpec) -> CheckpointFacts:
    """The model's facts, from the cache or their source (see operator.facts)."""
    source = spec.model
    if source.config is not None:
        return inline_facts(source)
    if source.scheme == "bundled":
        return bundled_facts()
    cached = ctx.facts_cache.get(source)
    if cached is not None:
        return cached
    if source.scheme == "hf":
        facts = _hub_facts(ctx, spec)
    else:
        facts = _volume_facts(ctx, md, spec)
    ctx.facts_cache.put(source, facts)
    return facts


def _secret_value(ctx: Context, namespace: str, ref) -> str:
    import base64

    secret = ctx.kube.get(path("v1", "secrets", namespace, ref.name))
    if secret is None or ref.key not in (secret.get("data") or {}):
        raise FactsError(f"spec.model.tokenSecretRef: secret {ref.name!r} with key {ref.key!r} "
                         f"not found in namespace {namespace}")
    return base64.b64decode(secret["data"][ref.key]).decode().strip()


def _hub_facts(ctx: Context, spec: DeploymentSpec) -> CheckpointFacts:
    if ctx.hub_facts is None:
        from brim.operator.hub import hub_facts
    else:
        hub_facts = ctx.hub_facts
    token = (_secret_value(ctx, spec.namespace, spec.model.token_secret)
             if spec.model.token_secret else None)
    try:
        return hub_facts(spec.model.repo, revision=spec.model.revision, token=token,
                         endpoint=ctx.settings.hf_endpoint)
    except FactsError:
        raise
    except (OSError, ValueError) as exc:  # network trouble: try again later
        raise FactsPending(f"reading {spec.model.uri} from the hub failed: {exc}",
                           delay=30) from None


def _volume_facts(ctx: Context, md: dict, spec: DeploymentSpec) -> CheckpointFacts:
    """Run (or look up) the inspect Job; its pod's termination message carries the facts."""
    namespace = spec.namespace
    job = ch.build_inspect_job(md, spec, ctx.settings)
    name = job["metadata"]["name"]
    live = ctx.kube.get(path("batch/v1", "jobs", namespace, name))
    if live is None:
        ctx.kube.create(path("batch/v1", "jobs", namespace), job)
        ctx.events(md, "Normal", "ReadingModel",
                   f"started Job {name} to read {spec.model.uri}'s facts")
        raise FactsPending(f"reading {spec.model.uri} with Job {name}", delay=5)
    pods = ctx.kube.list(path("v1", "pods", namespace), label_selector=f"job-name={name}")
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if not terminated:
                continue
            message = terminated.get("message") or ""
            if terminated.get("exitCode") == 0:
                try:
                    facts = decode_facts(message)
                except ValueError as exc:
                    raise FactsError(f"Job {name} printed no model facts ({exc})") from None
                ctx.kube.delete(path("batch/v1", "jobs", namespace, name))
                return facts
            ctx.kube.delete(path("batch/v1", "jobs", namespace, name))
            raise FactsError(message.strip() or ctx.kube.pod_log_tail(
                namespace, pod["metadata"]["name"]) or f"Job {name} failed")
    failed = [c for c in (live.get("status") or {}).get("conditions") or []
              if c.get("type") == "Failed" and c.get("status") == "True"]
    if failed:
        ctx.kube.delete(path("batch/v1", "jobs", namespace, name))
        raise FactsError(f"Job {name} failed: {failed[0].get('message', '')}")
    raise FactsPending(f"waiting for Job {name} to read {spec.model.uri}", delay=5)


# -- children ----------------------------------------------------------------------------------


def is_subset(desired, live) -> bool:
    """Whether `live` already has everything `desired` says (the apiserver adds defaults)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(is_subset(v, live.get(k))
                                              for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and \
            all(is_subset(d, x) for d, x in zip(desired, live))
    if isinstance(desired, (int, float)) and isinstance(live, str):
        return str(desired) == live
    return desired == live


def _collection(obj: dict) -> tuple[str, str]:
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural = {"Deployment": "deployments", "Service": "services",
              "PodDisruptionBudget": "poddisruptionbudgets",
              "ServiceMonitor": "servicemonitors", "Job": "jobs"}[kind]
    return api_version, plural


def apply(kube: Kube, desired: dict) -> tuple[str, dict]:
    """Create the child, or patch what differs: ("created" | "patched" | "unchanged", the
    object as the API now has it)."""
    api_version, plural = _collection(desired)
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    live = kube.get(path(api_version, plural, namespace, name))
    if live is None:
        try:
            return "created", kube.create(path(api_version, plural, namespace), desired)
        except KubeError as exc:
            if exc.status != 409:  # 409: created meanwhile; patch it below
                raise
            live = kube.get(path(api_version, plural, namespace, name)) or {}
    if is_subset(desired, live):
        return "unchanged", live
    meta = desired["metadata"]
    patch = {"metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}}
    patch.update({k: v for k, v in desired.items() if k not in ("apiVersion", "kind",
                                                                 "metadata")})
    return "patched", kube.patch(path(api_version, plural, namespace, name), patch)


def _remove(kube: Kube, api_version: str, plural: str, namespace: str, name: str) -> None:
    live = kube.get(path(api_version, plural, namespace, name))
    if live is not None and (live["metadata"].get("labels") or {}).get(
            ch.MANAGED_BY_LABEL) == ch.MANAGED_BY:
        kube.delete(path(api_version, plural, namespace, name))


def apply_children(ctx: Context, md: dict, spec: DeploymentSpec, plan: dict, *,
                   replicas: int | None = None) -> dict:
    """Every child of a plan that fits; returns the Deployment as the API has it."""
    namespace, name = spec.namespace, spec.name
    deployment = ch.build_deployment(md, spec, plan, ctx.settings)
    if replicas is not None:
        deployment["spec"]["replicas"] = replicas
    results = {"Deployment": apply(ctx.kube, deployment),
               "Service": apply(ctx.kube, ch.build_service(md, ctx.settings))}
    pdb = ch.build_pdb(md, spec)
    if pdb is not None:
        results["PodDisruptionBudget"] = apply(ctx.kube, pdb)
    else:
        _remove(ctx.kube, "policy/v1", "poddisruptionbudgets", namespace, name)
    if ctx.has_service_monitors():
        results["ServiceMonitor"] = apply(ctx.kube, ch.build_service_monitor(md))
    changed = {kind: what for kind, (what, _) in results.items() if what != "unchanged"}
    if changed:
        logger.info("%s/%s: %s", namespace, name,
                    ", ".join(f"{kind} {what}" for kind, what in changed.items()))
    return results["Deployment"][1]


# -- the reconciliation ------------------------------------------------------------------------


def _correction(status: dict) -> int:
    """Bytes a pod measured beyond the prediction, from a pod that could not fit."""
    measured = status.get("measured") or {}
    if measured.get("fits", True) or "nonKvBytes" not in measured:
        return 0
    return max(0, int(measured["nonKvBytes"]) - int(measured.get("predictedNonKvBytes", 0)))


def _status_patch(old, new):
    """A merge patch turning `old` into `new` (keys that went away become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {k: None for k in old if k not in new}
    for key, value in new.items():
        patch[key] = _status_patch(old.get(key), value) if isinstance(value, dict) else value
    return patch


def write_status(ctx: Context, md: dict, new_status: dict) -> None:
    old = md.get("status") or {}
    if old == new_status:
        return
    meta = md["metadata"]
    ctx.kube.patch(md_path(meta["namespace"], meta["name"], "status"),
                   {"status": _status_patch(old, new_status)})


def reconcile(ctx: Context, namespace: str, name: str) -> None:
    """One full pass for one ModelDeployment (KubeError when the API fails)."""
    with ctx.lock(namespace, name):
        md = ctx.kube.get(md_path(namespace, name))
        if md is None or md["metadata"].get("deletionTimestamp"):
            return
        _reconcile(ctx, md)


def _reconcile(ctx: Context, md: dict) -> None:
    meta = md["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation", 1)
    old = md.get("status") or {}
    status = {k: v for k, v in old.items() if k in ("measured", "lastGoodPlanGeneration")}
    status.update(observedGeneration=generation, selector=ch.selector_string(name),
                  endpoint=ch.endpoint(md, ctx.settings))
    deployment_path = path("apps/v1", "deployments", namespace, name)
    degraded = st.Condition("Degraded", "False", "AsPlanned")
    try:
        spec = parse_spec(md, default_gpu_memory_utilization=ctx.settings.gpu_memory_utilization)
    except SpecError as exc:
        planned = st.Condition("Planned", "False", "InvalidSpec", str(exc))
        _finish(ctx, md, status, old, planned, degraded, ctx.kube.get(deployment_path), 0)
        return

    plan = old.get("plan")
    last_good = old.get("lastGoodPlanGeneration")
    correction = _correction(old)
    # Plan again when this generation has no plan that fits and was applied, or when a pod
    # measured more memory than the plan allowed for.
    replan = (plan is None or not plan.get("fits") or last_good != generation
              or correction > int(plan.get("extraNonKvBytes", 0)))
    if replan:
        # A correction once measured keeps applying to later plans (a later pod that served
        # fine replaces status.measured, not what the GPU taught).
        carried = max(correction, int((plan or {}).get("extraNonKvBytes", 0)))
        try:
            plan, planned = _plan(ctx, md, spec, carried)
        except FactsPending as exc:
            # Not an error: the Job's completion (its event) or the resync plans again.
            planned = st.Condition("Planned", "Unknown", "ReadingModel", str(exc))
        except FactsError as exc:
            planned = st.Condition("Planned", "False", "ModelUnreadable", str(exc))
    else:
        planned = st.Condition("Planned", "True", "Planned", (plan.get("messages") or [""])[-1])
    if plan is not None:
        status["plan"] = plan

    deployment = ctx.kube.get(deployment_path)
    if planned.status == "True":
        status["lastGoodPlanGeneration"] = generation
        deployment = apply_children(ctx, md, spec, plan)
    elif (planned.reason == "DoesNotFit" and correction and last_good == generation
          and deployment is not None):
        # This generation's plan did not hold on the GPU (a pod measured less room), and
        # with what it measured the spec cannot fit: stop the crash loop, do not restart
        # pods that cannot fit.
        if (deployment.get("spec") or {}).get("replicas"):
            ctx.kube.patch(deployment_path, {"spec": {"replicas": 0}})
            deployment = ctx.kube.get(deployment_path)
        degraded = st.Condition("Degraded", "True", "DoesNotFitMeasured",
                                "a runtime pod measured less room than planned, and with what "
                                f"it measured the spec cannot fit: {planned.message}. Scaled to "
                                "0 replicas until the spec changes")
    elif deployment is not None and last_good is not None and planned.status == "False":
        degraded = st.Condition("Degraded", "True", "EditRefused",
                                f"generation {generation} was not applied ({planned.reason}: "
                                f"{planned.message}); the plan of generation {last_good} keeps "
                                "serving")
    _finish(ctx, md, status, old, planned, degraded, deployment, spec.replicas)


def _plan(ctx: Context, md: dict, spec: DeploymentSpec, correction: int) -> tuple[dict, object]:
    facts = load_facts(ctx, md, spec)
    classes = []
    if spec.device == "gpu":
        nodes = ctx.kube.list(path("v1", "nodes"))
        classes = gpu_classes(nodes, node_selector=spec.node_selector,
                              tolerations=[*ctx.settings.tolerations, *spec.tolerations],
                              spec_memory_bytes=spec.gpu_memory_bytes)
    decision = decide(spec, facts, classes, extra_non_kv_bytes=correction,
                      max_tensor_parallel_size=ctx.settings.max_tensor_parallel_size)
    unsupported = _unsupported(spec)
    if unsupported:
        return ({**st.plan_status(decision), "fits": False, "messages": [unsupported]},
                st.Condition("Planned", "False", "Unsupported", unsupported))
    if decision.fits:
        ctx.events(md, "Normal", "Planned", decision.message)
        return st.plan_status(decision), st.Condition("Planned", "True", "Planned",
                                                      decision.message)
    best = max((c for c in decision.candidates if c.plan is not None),
               key=lambda c: c.plan.num_gpu_blocks, default=None)
    ctx.events(md, "Warning", "DoesNotFit", decision.message)
    return (st.plan_status(decision, best),
            st.Condition("Planned", "False", "DoesNotFit", decision.message))


def _unsupported(spec: DeploymentSpec) -> str | None:
    """What the planner can plan but brim's runtime cannot run yet."""
    if spec.kv_cache_dtype == "fp8_e5m2":
        return ("spec.engine.kvCacheDtype: brim's runtime stores an FP8 KV cache as e4m3, not "
                "e5m2; use fp8 (or fp8_e4m3)")
    return None


def _finish(ctx: Context, md: dict, status: dict, old: dict, planned, degraded, deployment,
            desired: int) -> None:
    available, progressing, replicas, ready = st.rollout_conditions(deployment, desired)
    status.update(replicas=replicas, readyReplicas=ready,
                  ready=f"{ready}/{(deployment or {}).get('spec', {}).get('replicas', desired)}")
    status["phase"] = st.phase(planned, available, progressing, degraded)
    generation = md["metadata"].get("generation", 1)
    status["conditions"] = st.conditions([planned, available, progressing, degraded],
                                         old.get("conditions"), generation)
    write_status(ctx, md, status)


# -- what runtime pods measured ----------------------------------------------------------------


def _report_from_message(message: str) -> MemoryReport | None:
    try:
        return MemoryReport.from_json(json.loads(message))
    except (ValueError, TypeError, KeyError):
        return None


def fetch_memory_report(pod_ip: str, port: int, timeout: float = 3.0) -> MemoryReport | None:
    """A serving runtime's memory report (GET /memory), or None when it does not answer."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/memory", timeout=timeout) as resp:
            return MemoryReport.from_json(json.loads(resp.read()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def observe_pod(ctx: Context, pod: dict) -> bool:
    """Record what a runtime pod measured, once per container start; True when the owner
    must be reconciled (a pod that could not fit)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = (meta.get("labels") or {}).get(ch.MODEL_DEPLOYMENT_LABEL)
    if not name:
        return False
    for container in status.get("containerStatuses") or []:
        if container.get("name") != "runtime":
            continue
        restarts = int(container.get("restartCount") or 0)
        for state, count in (("state", restarts), ("lastState", restarts - 1)):
            terminated = (container.get(state) or {}).get("terminated") or {}
            report = _report_from_message(terminated.get("message") or "")
            if report is not None and not report.fits:
                if _record(ctx, meta, count, report, "termination-message", name):
                    return True
        if container.get("ready") and status.get("podIP"):
            key = (meta.get("uid"), restarts)
            if key not in ctx._recorded_starts:
                report = fetch_memory_report(status["podIP"], ctx.settings.runtime_port)
                if report is not None:
                    _record(ctx, meta, restarts, report, "http", name)
    return False


def _record(ctx: Context, pod_meta: dict, start: int, report: MemoryReport, source: str,
            name: str) -> bool:
    key = (pod_meta.get("uid"), start)
    if key in ctx._recorded_starts:
        return False
    namespace = pod_meta["namespace"]
    measured = st.measured_status(report, pod_meta["name"], source)
    with ctx.lock(namespace, name):
        md = ctx.kube.get(md_path(namespace, name))
        if md is None:
            return False
        ctx.kube.patch(md_path(namespace, name, "status"), {"status": {"measured": measured}})
    ctx._recorded_starts.add(key)
    if len(ctx._recorded_starts) > 10000:  # pods come and go: keep the memory bounded
        ctx._recorded_starts.clear()
    if not report.fits:
        ctx.events(md, "Warning", "MeasuredLess",
                   f"pod {pod_meta['name']} measured {report.num_gpu_blocks} KV blocks "
                   f"({report.kv_cache_tokens} tokens), fewer than max_model_len "
                   f"{report.requested_max_model_len}: planning again with what it measured")
    return True
