"""A ModelDeployment's model facts, without its weights, from wherever the model lives.

    bundled   the facts the runtime image's model has (shipped with brim)
    config    spec.model.config inline, with spec.model.weightsBytes or the parameter count
    hf://     config files and safetensors headers through huggingface_hub (range requests)
    pvc://    a short Job (no GPU) mounts the claim read-only and runs `brim facts`; its pod's
              termination message carries them back (see children.build_inspect_job)

Facts are cached per model and revision; a branch revision ("main") expires after a while,
a commit sha never.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from brim.runtime.planner.dtypes import MODEL_DTYPE_BYTES, canonical
from brim.runtime.planner.facts import (TENSOR_PARALLEL_SIZES, CheckpointFacts, declared_dtype,
                                        model_facts)

from brim.operator.spec import ModelSource

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class FactsPending(Exception):
    """The facts are being read (an inspect Job runs); try again after `delay` seconds."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class FactsError(ValueError):
    """The model cannot be read; the message says why and what to change."""


def inline_facts(source: ModelSource) -> CheckpointFacts:
    """spec.model.config as given; weights from spec.model.weightsBytes when set.

    weightsBytes counts the weights as served on one GPU without tensor parallelism, in the
    checkpoint's dtype; other dtypes scale it by their element size and TP divides it.
    """
    config = source.config or {}
    try:
        model_facts(config)
    except ValueError as exc:
        raise FactsError(f"spec.model.config: {exc}") from None
    if source.weights_bytes is None:
        return CheckpointFacts(config=config)
    declared = MODEL_DTYPE_BYTES.get(canonical(declared_dtype(config) or "bfloat16"), 2)
    table = {f"{d}x{tp}": -(-source.weights_bytes * d // declared // tp)
             for d in sorted(set(MODEL_DTYPE_BYTES.values())) for tp in TENSOR_PARALLEL_SIZES}
    return CheckpointFacts(config=config, weights_bytes=table)


def bundled_facts() -> CheckpointFacts:
    from brim.runtime.models.bundled import bundled_facts as facts

    return facts()


@dataclass(slots=True)
class _Entry:
    facts: CheckpointFacts
    expires: float


class FactsCache:
    """Facts per model source (uri and revision), thread-safe.

    ttl_seconds: how long facts of a moving revision (a branch, or none) are trusted.
    """

    def __init__(self, ttl_seconds: float = 3600.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, source: ModelSource) -> CheckpointFacts | None:
        with self._lock:
            entry = self._entries.get(source.cache_key)
            if entry is None or entry.expires < time.monotonic():
                return None
            return entry.facts

    def put(self, source: ModelSource, facts: CheckpointFacts) -> None:
        pinned = bool(source.revision and _COMMIT.match(source.revision))
        expires = float("inf") if pinned else time.monotonic() + self.ttl_seconds
        with self._lock:
            self._entries[source.cache_key] = _Entry(facts, expires)
