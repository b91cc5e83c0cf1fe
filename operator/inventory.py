"""The cluster's GPUs, read from its Nodes and grouped into classes the planner plans for.

A GPU class is every schedulable node with the same GPU product and memory: a plan made for
the class holds on any of its nodes, so the runtime's Deployment is pinned to it. The labels
are NVIDIA GPU Feature Discovery's:

    nvidia.com/gpu.product   NVIDIA-H100-80GB-HBM3   (MIG, single strategy: ...-MIG-1g.10gb)
    nvidia.com/gpu.memory    81559                   (MiB per GPU, or per MIG slice)
    nvidia.com/gpu.count     8
    allocatable nvidia.com/gpu: 8                    (what the scheduler can give)

MIG's mixed strategy exposes each slice profile as its own resource and labels instead:

    allocatable nvidia.com/mig-3g.40gb: 2
    nvidia.com/mig-3g.40gb.product  NVIDIA-H100-80GB-HBM3-MIG-3g.40gb
    nvidia.com/mig-3g.40gb.memory   40192

Each profile is a class of its own, one slice per replica (no tensor parallelism across
slices), requested as that resource.

Memory per GPU comes from the node's label, else from brim's table of products
(planner.gpus), else from `spec.gpu.memory`; a class with none of them cannot be planned and
says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from brim.runtime.planner.gpus import GPU_MEMORY_MIB, MiB, lookup_gpu

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
# Nodes with GPUs but no product label form one class, pinned with this product name.
UNLABELLED = "(unlabelled)"
# The taint GPU node pools carry (GKE, AKS, many installers); the runtime tolerates it.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True, slots=True)
class GpuClass:
    """Nodes with the same GPU product and memory.

    memory_bytes: per GPU; None when neither a label, brim's table nor spec.gpu.memory says.
    memory_source: "label", "table", "spec" or "unknown".
    max_gpus_per_node: the most allocatable GPUs on one node (bounds tensor parallelism).
    num_gpus: allocatable GPUs over all the class's nodes.
    """

    product: str
    memory_label: str | None  # the nodes' nvidia.com/gpu.memory, when they carry one
    memory_bytes: int | None
    memory_source: str
    max_gpus_per_node: int
    num_nodes: int
    num_gpus: int
    resource: str = GPU_RESOURCE  # what a pod requests: nvidia.com/gpu or a MIG profile's

    @property
    def is_mig_profile(self) -> bool:
        """A MIG slice profile of the mixed strategy: one slice per replica."""
        return self.resource != GPU_RESOURCE

    @property
    def is_labelled(self) -> bool:
        return self.product != UNLABELLED

    def describe(self) -> str:
        memory = "unknown memory" if self.memory_bytes is None else \
            f"{self.memory_bytes / 2**30:.1f} GiB"
        return (f"{self.product} ({memory} x {self.max_gpus_per_node} per node, "
                f"{self.num_nodes} node(s))")


def _quantity_int(value) -> int:
    """An integer Kubernetes quantity such as allocatable nvidia.com/gpu ("8")."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def _labels_match(labels: dict, selector: dict) -> bool:
    return all(labels.get(key) == value for key, value in (selector or {}).items())


def _tolerated(taint: dict, tolerations: list[dict]) -> bool:
    for toleration in tolerations:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        key = toleration.get("key")
        if toleration.get("operator", "Equal") == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def is_eligible(node: dict, node_selector: dict, tolerations: list[dict]) -> bool:
    """Whether a pod with this nodeSelector and these tolerations can land on the node."""
    spec, metadata = node.get("spec") or {}, node.get("metadata") or {}
    if spec.get("unschedulable"):
        return False
    if not _labels_match(metadata.get("labels") or {}, node_selector):
        return False
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and \
                not _tolerated(taint, tolerations):
            return False
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            return False
    return True


def _memory(product: str, label: str | None, spec_memory: int | None) -> tuple[int | None, str]:
    if label and label.isdigit() and int(label) > 0:
        return int(label) * MiB, "label"
    if product in GPU_MEMORY_MIB:
        return GPU_MEMORY_MIB[product] * MiB, "table"
    if product != UNLABELLED:
        try:
            return lookup_gpu(product)[1], "table"
        except ValueError:
            pass
    if spec_memory is not None:
        return spec_memory, "spec"
    return None, "unknown"


def gpu_classes(nodes: list[dict], *, node_selector: dict | None = None,
                tolerations: list[dict] | None = None,
                spec_memory_bytes: int | None = None) -> list[GpuClass]:
    """The GPU classes of the nodes a runtime pod could land on, largest memory first."""
    tolerations = [GPU_TOLERATION, *(tolerations or [])]
    groups: dict[tuple[str, str | None, str], list[int]] = {}
    for node in nodes:
        if not is_eligible(node, node_selector or {}, tolerations):
            continue
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        labels = (node.get("metadata") or {}).get("labels") or {}
        for resource, value in allocatable.items():
            count = _quantity_int(value)
            if count < 1:
                continue
            if resource == GPU_RESOURCE:
                key = (labels.get(PRODUCT_LABEL) or UNLABELLED, labels.get(MEMORY_LABEL),
                       resource)
            elif resource.startswith(MIG_RESOURCE_PREFIX):
                profile = resource[len(MIG_RESOURCE_PREFIX):]
                product = labels.get(f"{resource}.product") or \
                    f"{labels.get(PRODUCT_LABEL) or UNLABELLED}-MIG-{profile}"
                key = (product, labels.get(f"{resource}.memory"), resource)
            else:
                continue
            groups.setdefault(key, []).append(count)
    classes = []
    for (product, memory_label, resource), counts in groups.items():
        memory, source = _memory(product, memory_label, spec_memory_bytes)
        mig = resource != GPU_RESOURCE
        classes.append(GpuClass(product=product, memory_label=memory_label,
                                memory_bytes=memory, memory_source=source,
                                max_gpus_per_node=1 if mig else max(counts),
                                num_nodes=len(counts), num_gpus=sum(counts),
                                resource=resource))
    return sorted(classes, key=lambda c: (-(c.memory_bytes or 0), c.product))


def pinning(gpu_class: GpuClass) -> tuple[dict, dict | None]:
    """(nodeSelector, affinity) that keep a pod on the class's nodes."""
    if gpu_class.is_mig_profile:
        return {f"{gpu_class.resource}.product": gpu_class.product}, None
    if gpu_class.is_labelled:
        selector = {PRODUCT_LABEL: gpu_class.product}
        if gpu_class.memory_label:  # same product, other memory (MIG slices) is another class
            selector[MEMORY_LABEL] = gpu_class.memory_label
        return selector, None
    # Unlabelled GPU nodes: the nodes that have no product label at all.
    term = {"matchExpressions": [{"key": PRODUCT_LABEL, "operator": "DoesNotExist"}]}
    return {}, {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [term]}}}
