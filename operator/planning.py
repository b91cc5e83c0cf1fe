"""Which GPU class and how many GPUs per replica: the plan a ModelDeployment runs with.

For each GPU class the spec accepts and each tensor-parallel size the model's heads allow
(never more GPUs than one node of the class has), brim's planner predicts what fits. The
choice, among the plans that fit:

    1. the user's order of preference (spec.gpu.products; any order when it is empty),
    2. then the fewest GPUs per replica,
    3. then the smaller GPU (the larger one stays free for what needs it).

`maxModelLen: auto` takes the largest length that fits, never below `minModelLen`. When
nothing fits, the decision says why with the numbers, and what would fit instead: a larger
tensor-parallel size, a shorter context, or a GPU product the cluster does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

from brim.runtime.planner.facts import CheckpointFacts
from brim.runtime.planner.gpus import GPU_MEMORY_MIB, MiB
from brim.runtime.planner.memory import GiB, Plan, PlanRequest, plan

from brim.operator.inventory import GpuClass
from brim.operator.spec import DeploymentSpec, memory_request_bytes


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (GPU class, tensor-parallel size) the operator planned, or why it could not.

    plan: None when the class could not be planned at all (reason says why).
    """

    gpu_class: GpuClass | None  # None on CPU
    tensor_parallel_size: int
    plan: Plan | None
    reason: str

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    @property
    def product(self) -> str:
        return self.gpu_class.product if self.gpu_class else "cpu"


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen plan (None when nothing fits), every candidate considered, and a message."""

    chosen: Candidate | None
    candidates: tuple[Candidate, ...]
    message: str

    @property
    def fits(self) -> bool:
        return self.chosen is not None


def _request(spec: DeploymentSpec, checkpoint: CheckpointFacts, memory_bytes: int, tp: int,
             extra_non_kv_bytes: int, device: str) -> PlanRequest:
    optional = {}
    if spec.max_num_seqs is not None:
        optional["max_num_seqs"] = spec.max_num_seqs
    return PlanRequest(
        checkpoint=checkpoint, gpu_memory_bytes=memory_bytes,
        gpu_memory_utilization=spec.gpu_memory_utilization, tensor_parallel_size=tp,
        max_model_len=spec.max_model_len, min_model_len=spec.min_model_len,
        max_num_batched_tokens=spec.max_num_batched_tokens, block_size=spec.block_size,
        dtype=spec.dtype, kv_cache_dtype=spec.kv_cache_dtype, quantization=spec.quantization,
        extra_non_kv_bytes=extra_non_kv_bytes, device=device, **optional)


def _tp_sizes(spec: DeploymentSpec, checkpoint: CheckpointFacts, gpus_per_node: int,
              max_tp: int) -> list[int]:
    allowed = [tp for tp in checkpoint.model.tensor_parallel_sizes() if tp <= max_tp]
    if spec.gpu_count != "auto":  # any size the runtime can split the model over (3 too)
        count = spec.gpu_count
        fits = checkpoint.model.splits_evenly(count) and count <= min(max_tp, gpus_per_node)
        return [count] if fits else []
    return [tp for tp in allowed if tp <= gpus_per_node]


def _splitting_sizes(checkpoint: CheckpointFacts) -> list[int]:
    facts = checkpoint.model
    return [n for n in range(1, facts.num_attention_heads + 1) if facts.splits_evenly(n)]


def _preference(spec: DeploymentSpec, candidate: Candidate) -> tuple:
    products = spec.gpu_products
    rank = products.index(candidate.product) if candidate.product in products else 0
    return (rank, candidate.tensor_parallel_size, candidate.gpu_class.memory_bytes or 0,
            candidate.product)


def decide(spec: DeploymentSpec, checkpoint: CheckpointFacts, classes: list[GpuClass], *,
           extra_non_kv_bytes: int = 0, max_tensor_parallel_size: int = 8) -> Decision:
    """The plan for this spec on these GPU classes (see the module's docstring).

    extra_non_kv_bytes: memory a pod measured beyond the prediction (fed back).
    max_tensor_parallel_size: the most GPUs per replica the runtime runs.
    """
    if spec.device == "cpu":
        return _decide_cpu(spec, checkpoint, extra_non_kv_bytes)
    heads = checkpoint.model.num_attention_heads
    candidates = []
    for gpu_class in classes:
        if spec.gpu_products and gpu_class.product not in spec.gpu_products:
            continue
        if gpu_class.memory_bytes is None:
            candidates.append(Candidate(gpu_class, 0, None, (
                f"{gpu_class.product}: no GPU memory known (no nvidia.com/gpu.memory label, not "
                "in brim's GPU table): set spec.gpu.memory, e.g. 24Gi")))
            continue
        sizes = _tp_sizes(spec, checkpoint, gpu_class.max_gpus_per_node,
                          max_tensor_parallel_size)
        if not sizes:
            wanted = spec.gpu_count
            candidates.append(Candidate(gpu_class, 0, None, (
                f"{gpu_class.product}: {gpu_class.max_gpus_per_node} GPU(s) per node; "
                + (f"spec.gpu.count {wanted} does not split the model's {heads} attention "
                   f"heads (use one of {_splitting_sizes(checkpoint)}) or exceeds the GPUs of "
                   f"one node or --max-tensor-parallel-size {max_tensor_parallel_size}"
                   if wanted != "auto" else
                   "no tensor-parallel size of 1, 2, 4, 8 fits one node and the heads"))))
            continue
        for tp in sizes:
            p = plan(_request(spec, checkpoint, gpu_class.memory_bytes, tp, extra_non_kv_bytes,
                              "cuda"))
            candidates.append(Candidate(gpu_class, tp, p, _reason(p)))
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: _preference(spec, c))
    if fitting:
        chosen = fitting[0]
        return Decision(chosen, tuple(candidates), _fits_message(chosen))
    return Decision(None, tuple(candidates), _refusal(spec, checkpoint, classes, candidates,
                                                     extra_non_kv_bytes,
                                                     max_tensor_parallel_size))


def _decide_cpu(spec: DeploymentSpec, checkpoint: CheckpointFacts,
                extra_non_kv_bytes: int) -> Decision:
    memory = memory_request_bytes(spec)
    if memory is None:
        candidate = Candidate(None, 1, None, "spec.device cpu needs "
                              "spec.resources.requests.memory: the plan sizes against it")
        return Decision(None, (candidate,), candidate.reason)
    p = plan(_request(spec, checkpoint, memory, 1, extra_non_kv_bytes, "cpu"))
    candidate = Candidate(None, 1, p, _reason(p))
    if p.fits:
        return Decision(candidate, (candidate,), _fits_message(candidate))
    return Decision(None, (candidate,), "does not fit in the container's memory ("
                    f"{memory / GiB:.2f} GiB): " + "; ".join(p.messages))


def _reason(p: Plan) -> str:
    """The plan's verdict, without the planner's advice (the operator gives its own)."""
    return next((m for m in p.messages if m.startswith(("fits", "does not fit"))
                 or "longer than" in m), p.messages[0] if p.messages else "")


def _fits_message(candidate: Candidate) -> str:
    p = candidate.plan
    where = ("CPU" if candidate.gpu_class is None else
             f"{candidate.tensor_parallel_size}x {candidate.product}")
    return (f"{where}: maxModelLen {p.max_model_len}, {p.num_gpu_blocks} KV blocks "
            f"({p.kv_cache_tokens} tokens, {p.max_concurrency} requests of maxModelLen at "
            f"once), gpuMemoryUtilization {p.gpu_memory_utilization:.2f}")


def _refusal(spec: DeploymentSpec, checkpoint: CheckpointFacts, classes: list[GpuClass],
             candidates: list[Candidate], extra_non_kv_bytes: int, max_tp: int) -> str:
    """Why nothing fits, with the numbers, and what would."""
    if not classes:
        return ("no schedulable node has GPUs (allocatable nvidia.com/gpu) that match "
                "spec.nodeSelector and spec.tolerations")
    if not candidates:
        have = ", ".join(sorted({c.product for c in classes}))
        return (f"no node has a GPU in spec.gpu.products ({', '.join(spec.gpu_products)}); "
                f"the cluster has {have}")
    planned = [c for c in candidates if c.plan is not None]
    parts = []
    if planned:
        weights = planned[0].plan.weights_bytes * planned[0].tensor_parallel_size
        parts.append(f"{weights / GiB:.1f} GiB of weights")
    for gpu_class in {c.gpu_class.product: c.gpu_class for c in candidates}.values():
        memory = "unknown memory" if gpu_class.memory_bytes is None else \
            f"{gpu_class.memory_bytes / GiB:.1f} GiB"
        parts.append(f"{gpu_class.product} has {memory} x {gpu_class.max_gpus_per_node} "
                     "per node")
    # The candidate with the most KV room says best why it does not fit.
    best = max(planned, key=lambda c: (c.plan.num_gpu_blocks, c.tensor_parallel_size),
               default=None)
    if best is not None:
        why = next((m for m in best.plan.messages if m.startswith("does not fit")
                    or "longer than" in m), "")
        if why:
            parts.append(f"on {best.tensor_parallel_size}x {best.product}: {why}")
    shorter = _best_shorter(planned)
    elsewhere = _fits_elsewhere(spec, checkpoint, classes, extra_non_kv_bytes, max_tp)
    if elsewhere:
        parts.append(elsewhere + (f", {shorter}" if shorter else ""))
    elif shorter:
        parts.append(shorter)
    return "; ".join(parts)


def _best_shorter(candidates: list[Candidate]) -> str | None:
    """The longest maxModelLen a cluster class would hold, when the length is what is wrong."""
    best = None
    for c in candidates:
        p = c.plan
        if p.num_gpu_blocks <= 0:
            continue
        longest = min(p.derived_max_model_len,
                      p.num_gpu_blocks // p.min_concurrency * p.block_size)
        if best is None or longest > best[0]:
            best = (longest, c)
    if best is None:
        return None
    longest, c = best
    field = "minModelLen" if c.plan.min_model_len is not None else "maxModelLen"
    return f"or set {field} <= {longest} to fit on {c.tensor_parallel_size}x {c.product}"


def _fits_elsewhere(spec: DeploymentSpec, checkpoint: CheckpointFacts, classes: list[GpuClass],
                    extra_non_kv_bytes: int, max_tp: int) -> str | None:
    """For each GPU count, the smallest GPU (this cluster's or any brim knows) on which the
    spec fits as asked; at most three, fewest GPUs first."""
    options = [(c.product, c.memory_bytes, min(c.max_gpus_per_node, max_tp)) for c in classes
               if c.memory_bytes is not None]
    known = {product for product, _, _ in options}
    options += [(product, mib * MiB, max_tp) for product, mib in GPU_MEMORY_MIB.items()
                if product not in known]
    best: dict[int, tuple] = {}
    for tp in checkpoint.model.tensor_parallel_sizes():
        if spec.gpu_count != "auto" and tp != spec.gpu_count:
            continue
        for product, memory, max_gpus in sorted(options, key=lambda o: (o[1], o[0])):
            if tp > max_gpus:
                continue
            p = plan(_request(spec, checkpoint, memory, tp, extra_non_kv_bytes, "cuda"))
            if p.fits:
                best[tp] = (product, p)
                break
    if not best:
        return ("no GPU brim knows holds it with these settings: use a smaller model, a "
                "shorter maxModelLen or an FP8 KV cache")
    shown = []
    for tp, (product, p) in sorted(best.items())[:3]:
        where = "" if product in known else " (not in this cluster)"
        shown.append(f"{tp}x {product}{where} with maxModelLen <= "
                     f"{min(p.derived_max_model_len, p.kv_cache_tokens)}")
    return "fits on " + ", or ".join(shown)
