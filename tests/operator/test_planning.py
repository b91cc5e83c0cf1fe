"""The operator's plan on real published configs and GPU mixes (pure: no API, no kopf)."""

from __future__ import annotations

import pytest

from brim.operator.inventory import gpu_classes, pinning
from brim.operator.planning import decide
from brim.operator.spec import SpecError, parse_spec
from brim.runtime.planner.memory import GiB, PlanRequest, plan
from tests.operator.planning_helpers import facts, gpu_node, model_deployment

L4 = ("NVIDIA-L4", 23034)
H100 = ("NVIDIA-H100-80GB-HBM3", 81559)
A10G = ("NVIDIA-A10G", 23028)


def _decide(nodes, model="Llama-3.1-8B-Instruct", max_tp=8, **spec):
    parsed = parse_spec(model_deployment(**spec))
    classes = gpu_classes(nodes, node_selector=parsed.node_selector,
                          tolerations=list(parsed.tolerations),
                          spec_memory_bytes=parsed.gpu_memory_bytes)
    return decide(parsed, facts(model), classes, max_tensor_parallel_size=max_tp)


def test_llama_8b_on_one_l4_gets_the_length_that_fits():
    decision = _decide([gpu_node("l4", *L4[:1], 1, L4[1])], engine={"maxModelLen": "auto"})
    chosen = decision.chosen
    assert chosen.product == "NVIDIA-L4" and chosen.tensor_parallel_size == 1
    # Exactly what `brim plan` says for one L4 at the same settings.
    same = plan(PlanRequest(checkpoint=facts("Llama-3.1-8B-Instruct"),
                            gpu_memory_bytes=23034 * 2**20, max_model_len="auto",
                            gpu_memory_utilization="auto"))
    assert chosen.plan == same
    assert 16000 < chosen.plan.max_model_len < 131072  # shorter than the model's 128k
    assert chosen.plan.num_gpu_blocks * 16 >= chosen.plan.max_model_len


def test_llama_70b_on_l4_only_nodes_is_refused_with_the_numbers_and_h100_named():
    nodes = [gpu_node(f"l4-{i}", "NVIDIA-L4", 4, 23034) for i in range(3)]
    decision = _decide(nodes, model="Llama-3.1-70B-Instruct",
                       gpu={"products": ["NVIDIA-L4"]}, engine={"maxModelLen": "32k"})
    assert not decision.fits
    message = decision.message
    assert "131.5 GiB of weights" in message
    assert "NVIDIA-L4 has 22.5 GiB x 4 per node" in message
    assert "2x NVIDIA-H100-80GB-HBM3 (not in this cluster)" in message
    assert all(not c.fits for c in decision.candidates)
    # The 4-GPU L4 plan was tried (the most one node has) and not the 8-GPU one.
    assert sorted(c.tensor_parallel_size for c in decision.candidates) == [1, 2, 4]


def test_preference_order_is_honoured_then_fewest_gpus_then_smaller_gpu():
    nodes = [gpu_node("l4", "NVIDIA-L4", 4, 23034), gpu_node("h100", *H100[:1], 8, H100[1]),
             gpu_node("a10g", "NVIDIA-A10G", 4, 23028)]
    # The user prefers H100 over L4: H100 is chosen although L4 also fits.
    first = _decide(nodes, gpu={"products": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L4"]},
                    engine={"maxModelLen": "8k"})
    assert (first.chosen.product, first.chosen.tensor_parallel_size) == (
        "NVIDIA-H100-80GB-HBM3", 1)
    assert any(c.fits and c.product == "NVIDIA-L4" for c in first.candidates)
    # No preference: fewest GPUs, then the smaller GPU (A10G's 23028 MiB < L4's 23034).
    any_gpu = _decide(nodes, engine={"maxModelLen": "8k"})
    assert (any_gpu.chosen.product, any_gpu.chosen.tensor_parallel_size) == ("NVIDIA-A10G", 1)
    # A length only two L4s hold: 2x L4 is preferred over the H100 the user ranked second.
    long = _decide(nodes, gpu={"products": ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"]},
                   engine={"maxModelLen": 131072})
    assert (long.chosen.product, long.chosen.tensor_parallel_size) == ("NVIDIA-L4", 2)


@pytest.mark.parametrize("model", ["Llama-3.1-8B-Instruct", "Qwen2-7B-Instruct",
                                   "SmolLM2-135M-Instruct", "Phi-3-mini-4k-instruct"])
def test_tensor_parallel_never_exceeds_a_node_nor_fails_to_divide_the_heads(model):
    nodes = [gpu_node("t4", "Tesla-T4", 2, 15360), gpu_node("a100", "NVIDIA-A100-SXM4-40GB", 8),
             gpu_node("l4", "NVIDIA-L4", 4, 23034)]
    decision = _decide(nodes, model=model, engine={"maxModelLen": "auto"})
    m = facts(model).model
    for c in decision.candidates:
        tp = c.tensor_parallel_size
        assert tp <= c.gpu_class.max_gpus_per_node
        assert m.num_attention_heads % tp == 0
        assert m.num_kv_heads % tp == 0 or tp % m.num_kv_heads == 0
    assert decision.fits


def test_an_explicit_gpu_count_is_used_or_refused():
    nodes = [gpu_node("l4", "NVIDIA-L4", 4, 23034)]
    two = _decide(nodes, gpu={"count": 2}, engine={"maxModelLen": "8k"})
    assert {c.tensor_parallel_size for c in two.candidates} == {2}
    too_many = _decide(nodes, gpu={"count": 8}, engine={"maxModelLen": "8k"})
    assert not too_many.fits and "spec.gpu.count 8" in too_many.candidates[0].reason


def test_an_explicit_gpu_count_may_be_any_size_that_splits_the_heads():
    # SmolLM2: 9 heads, 3 KV heads, MLP 1536: 3 GPUs split it (the runtime runs TP=3); 2 do
    # not (nor do 9: 1536 / 9), and the refusal names the sizes that do.
    nodes = [gpu_node("l4", "NVIDIA-L4", 4, 23034)]
    three = _decide(nodes, "SmolLM2-135M-Instruct", gpu={"count": 3},
                    engine={"maxModelLen": "8k"})
    assert three.fits and three.chosen.tensor_parallel_size == 3
    two = _decide(nodes, "SmolLM2-135M-Instruct", gpu={"count": 2}, engine={"maxModelLen": "8k"})
    assert not two.fits and "use one of [1, 3]" in two.candidates[0].reason
    capped = _decide(nodes, "SmolLM2-135M-Instruct", max_tp=1, gpu={"count": 3},
                     engine={"maxModelLen": "8k"})
    assert not capped.fits and "--max-tensor-parallel-size 1" in capped.candidates[0].reason


def test_a_node_without_labels_uses_spec_gpu_memory_or_says_it_needs_it():
    nodes = [gpu_node("bare", None, 1)]
    unknown = _decide(nodes, engine={"maxModelLen": "8k"})
    assert not unknown.fits
    assert "set spec.gpu.memory" in unknown.candidates[0].reason
    told = _decide(nodes, gpu={"memory": "24Gi"}, engine={"maxModelLen": "8k"})
    assert told.fits and told.chosen.plan.gpu_memory_bytes == 24 * GiB
    selector, affinity = pinning(told.chosen.gpu_class)
    assert selector == {} and affinity["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "DoesNotExist"}]


def test_the_table_fills_a_missing_memory_label():
    decision = _decide([gpu_node("h", "NVIDIA-H100-80GB-HBM3", 1)], engine={"maxModelLen": "8k"})
    assert decision.chosen.gpu_class.memory_source == "table"
    assert decision.chosen.plan.gpu_memory_bytes == 81559 * 2**20


def test_nodes_the_pods_cannot_land_on_do_not_count():
    taint = {"key": "dedicated", "value": "training", "effect": "NoSchedule"}
    nodes = [gpu_node("cordoned", *H100[:1], 8, H100[1], unschedulable=True),
             gpu_node("tainted", *H100[:1], 8, H100[1], taints=[taint]),
             gpu_node("notready", *H100[:1], 8, H100[1], ready=False),
             gpu_node("other-zone", *H100[:1], 8, H100[1], labels={"zone": "b"}),
             gpu_node("l4", "NVIDIA-L4", 1, 23034, labels={"zone": "a"})]
    decision = _decide(nodes, nodeSelector={"zone": "a"}, engine={"maxModelLen": "8k"})
    assert {c.product for c in decision.candidates} == {"NVIDIA-L4"}
    tolerated = _decide(nodes[:2], tolerations=[{"key": "dedicated", "operator": "Equal",
                                                 "value": "training", "effect": "NoSchedule"}],
                        engine={"maxModelLen": "8k"})
    assert tolerated.chosen.product == "NVIDIA-H100-80GB-HBM3"
    # The GPU taint itself is always tolerated.
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert _decide([gpu_node("g", "NVIDIA-L4", 1, 23034, taints=[gpu_taint])],
                   engine={"maxModelLen": "8k"}).fits


def test_no_gpu_nodes_says_so():
    decision = _decide([], engine={"maxModelLen": "8k"})
    assert not decision.fits and "no schedulable node has GPUs" in decision.message


def test_products_the_cluster_lacks_are_named():
    decision = _decide([gpu_node("l4", "NVIDIA-L4", 1, 23034)],
                       gpu={"products": ["NVIDIA-H200"]})
    assert "no node has a GPU in spec.gpu.products (NVIDIA-H200); the cluster has NVIDIA-L4" \
        in decision.message


def test_a_cpu_deployment_plans_against_the_container_memory():
    decision = _decide([], model="SmolLM2-135M-Instruct", device="cpu",
                       resources={"requests": {"memory": "2Gi"}},
                       engine={"maxModelLen": "4k", "maxNumSeqs": 8})
    assert decision.fits and decision.chosen.gpu_class is None
    assert decision.chosen.plan.gpu_memory_bytes == 2 * GiB
    assert decision.chosen.plan.device == "cpu" and decision.chosen.plan.num_gpu_blocks > 250
    small = _decide([], model="SmolLM2-135M-Instruct", device="cpu",
                    resources={"requests": {"memory": "1Gi"}}, engine={"maxModelLen": "4k"})
    assert not small.fits and "container's memory (1.00 GiB)" in small.message


@pytest.mark.parametrize("spec, field", [
    ({"engine": {"gpuMemoryUtilization": True}}, "spec.engine.gpuMemoryUtilization"),
    ({"engine": {"gpuMemoryUtilization": {}}}, "spec.engine.gpuMemoryUtilization"),
    ({"engine": {"maxModelLen": "1.1K"}}, "spec.engine.maxModelLen"),
    ({"engine": {"minModelLen": "64k", "maxModelLen": 8192}}, "spec.engine.minModelLen"),
    ({"gpu": {"memory": "lots"}}, "spec.gpu.memory"),
    ({"model": {"uri": "s3://bucket/model"}}, "spec.model.uri"),
])
def test_what_the_schema_cannot_refuse_is_refused_with_the_field(spec, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(model_deployment(**spec))


def test_mig_slices_are_classes_of_their_own():
    h100 = "NVIDIA-H100-80GB-HBM3"
    mixed = gpu_node("mig-mixed", h100, 0, 81559, labels={
        "nvidia.com/mig.strategy": "mixed",
        "nvidia.com/mig-1g.10gb.product": f"{h100}-MIG-1g.10gb",
        "nvidia.com/mig-1g.10gb.memory": "9856",
        "nvidia.com/mig-3g.40gb.product": f"{h100}-MIG-3g.40gb",
        "nvidia.com/mig-3g.40gb.memory": "40192"})
    mixed["status"]["allocatable"].update({"nvidia.com/mig-1g.10gb": "4",
                                           "nvidia.com/mig-3g.40gb": "1"})
    # Single strategy: the slice is "the GPU" in the usual labels.
    single = gpu_node("mig-single", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", 7, 4864)
    classes = gpu_classes([mixed, single])
    by_product = {c.product: c for c in classes}
    three = by_product[f"{h100}-MIG-3g.40gb"]
    assert (three.resource, three.memory_bytes, three.max_gpus_per_node) == (
        "nvidia.com/mig-3g.40gb", 40192 * 2**20, 1)
    assert by_product["NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"].resource == "nvidia.com/gpu"
    decision = decide(parse_spec(model_deployment(engine={"maxModelLen": "8k"})),
                      facts("Llama-3.1-8B-Instruct"), classes, max_tensor_parallel_size=8)
    chosen = decision.chosen
    assert (chosen.product, chosen.tensor_parallel_size) == (f"{h100}-MIG-3g.40gb", 1)
    assert pinning(chosen.gpu_class) == ({"nvidia.com/mig-3g.40gb.product": f"{h100}-MIG-3g.40gb"},
                                         None)
    assert all(c.tensor_parallel_size <= 1 for c in decision.candidates
               if c.gpu_class.is_mig_profile)
    from brim.operator.children import build_deployment
    from brim.operator.settings import OperatorSettings
    from brim.operator.status import plan_status

    md = model_deployment(engine={"maxModelLen": "8k"})
    deployment = build_deployment(md, parse_spec(md), plan_status(decision), OperatorSettings())
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == "1" and "nvidia.com/gpu" not in limits
