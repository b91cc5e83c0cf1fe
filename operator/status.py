"""A ModelDeployment's status, computed from what is true now (never accumulated).

    Planned      True: status.plan fits and its children are applied. False: DoesNotFit,
                 InvalidSpec, ModelUnreadable, Unsupported (with the numbers and the fix).
    Available    the Deployment has at least its desired replicas ready (or 0 desired).
    Progressing  a rollout is under way (new pods not all ready yet).
    Degraded     something the user must act on while the last good plan (if any) runs: a
                 refused edit, or pods that measured less room than planned.

`phase` condenses them for `kubectl get md`: Pending, Planned, Progressing, Available,
Degraded, DoesNotFit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from brim.runtime.planner.memory import Plan
from brim.runtime.planner.report import MemoryReport

from brim.operator.planning import Candidate, Decision

CONDITION_TYPES = ("Planned", "Available", "Progressing", "Degraded")
MAX_ALTERNATIVES = 64
MAX_MESSAGE = 32768


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def plan_status(decision: Decision, candidate: Candidate | None = None) -> dict:
    """status.plan: every number of the chosen (or best refused) plan, camelCase, with the
    GPU class, its pinning and the alternatives considered."""
    from brim.operator.inventory import pinning

    candidate = candidate or decision.chosen
    out: dict = {"fits": decision.fits}
    if candidate is not None and candidate.plan is not None:
        p: Plan = candidate.plan
        for name, value in p.to_dict().items():
            if name in ("device", "min_model_len") or value is None:
                continue
            out[_camel(name)] = list(value) if isinstance(value, (list, tuple)) else value
        out["fits"] = decision.fits
        out["device"] = "cpu" if p.device == "cpu" else "gpu"
        if p.min_model_len is not None:
            out["minModelLen"] = p.min_model_len
        if candidate.gpu_class is not None:
            out["gpuProduct"] = candidate.gpu_class.product
            out["gpuResource"] = candidate.gpu_class.resource
            node_selector, _ = pinning(candidate.gpu_class)
            out["nodeSelector"] = node_selector
    if not decision.fits:
        out["messages"] = [decision.message[:MAX_MESSAGE]]
    out["alternatives"] = [_alternative(c) for c in decision.candidates][:MAX_ALTERNATIVES]
    return out


def _alternative(c: Candidate) -> dict:
    entry = {"gpuProduct": c.product, "tensorParallelSize": c.tensor_parallel_size,
             "fits": c.fits, "reason": c.reason[:1024]}
    if c.gpu_class is not None and c.gpu_class.memory_bytes is not None:
        entry["gpuMemoryBytes"] = c.gpu_class.memory_bytes
    if c.plan is not None:
        entry["gpuMemoryBytes"] = c.plan.gpu_memory_bytes
        entry["maxModelLen"] = max(c.plan.max_model_len, 0)
        entry["maxConcurrency"] = c.plan.max_concurrency
    return entry


def measured_status(report: MemoryReport, pod: str, source: str) -> dict:
    """status.measured from a runtime's memory report."""
    out = {"numGpuBlocks": report.num_gpu_blocks, "weightsBytes": report.weights_bytes,
           "fits": report.fits, "pod": pod, "observedAt": now(), "source": source}
    if report.measured is not None:
        out["nonKvBytes"] = report.measured.non_kv_bytes
        out["numGpuBlocks"] = report.measured.num_gpu_blocks
    if report.predicted is not None:
        out["predictedNonKvBytes"] = report.predicted.non_kv_bytes
    error = report.num_gpu_blocks_error_percent
    if error is not None:
        out["errorPercent"] = round(error, 3)
    return out


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True", "False", "Unknown"
    reason: str
    message: str = ""


def conditions(new: list[Condition], old: list[dict] | None, generation: int) -> list[dict]:
    """The conditions as written: lastTransitionTime kept while a condition's status holds."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        before = previous.get(c.type)
        changed = before is None or before.get("status") != c.status
        out.append({"type": c.type, "status": c.status, "reason": c.reason,
                    "message": c.message[:MAX_MESSAGE], "observedGeneration": generation,
                    "lastTransitionTime": now() if changed else before["lastTransitionTime"]})
    return out


def rollout_conditions(deployment: dict | None, desired: int) -> tuple[Condition, Condition, int,
                                                                        int]:
    """(Available, Progressing, replicas, ready replicas) from the runtime Deployment."""
    if deployment is None:
        return (Condition("Available", "False", "NoDeployment", "no runtime Deployment"),
                Condition("Progressing", "False", "NoDeployment", ""), 0, 0)
    status = deployment.get("status") or {}
    replicas = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    wanted = int((deployment.get("spec") or {}).get("replicas", desired))
    current = (status.get("observedGeneration") or 0) >= \
        (deployment.get("metadata") or {}).get("generation", 0)
    if wanted == 0:
        available = Condition("Available", "True", "ScaledToZero", "0 replicas desired")
    elif ready >= wanted:
        available = Condition("Available", "True", "AllReplicasReady",
                              f"{ready}/{wanted} replicas ready")
    elif ready > 0:
        available = Condition("Available", "True", "SomeReplicasReady",
                              f"{ready}/{wanted} replicas ready")
    else:
        available = Condition("Available", "False", "NoReplicasReady",
                              f"0/{wanted} replicas ready")
    done = current and updated >= wanted and ready >= wanted and replicas <= wanted
    progressing = (Condition("Progressing", "False", "RolloutComplete",
                             f"{updated}/{wanted} replicas run the current plan")
                   if done else
                   Condition("Progressing", "True", "RollingOut",
                             f"{updated}/{wanted} replicas updated, {ready} ready"))
    return available, progressing, replicas, ready


def phase(planned: Condition, available: Condition, progressing: Condition,
          degraded: Condition) -> str:
    """The STATUS column: the one word a user needs first."""
    if planned.status != "True" and planned.reason == "ReadingModel":
        return "Pending"
    if degraded.status == "True":
        return "Degraded"
    if planned.status != "True":
        return "DoesNotFit" if planned.reason == "DoesNotFit" else "Degraded"
    if progressing.status == "True":
        return "Progressing"
    return "Available" if available.status == "True" else "Planned"
