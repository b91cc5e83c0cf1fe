"""brim's planner: what fits on a GPU, worked out before anything starts.

Torch-free and standard-library only: the operator (whose image has no torch), `brim plan`
and the engine all import it, so they agree by construction.

    lengths  token counts ("32k"), the model's longest context, default step budgets
    dtypes   dtype names, aliases and byte sizes
    facts    the one reader of config.json, tokenizer_config.json and safetensors headers
    gpus     GPU products and their memory; memory sizes ("80GiB")
    memory   the memory model: overheads, PlanRequest -> plan() -> Plan
    report   MemoryReport: predicted and measured side by side
"""

from brim.runtime.planner.facts import CheckpointFacts, ModelFacts, model_facts, read_checkpoint
from brim.runtime.planner.gpus import lookup_gpu, parse_memory
from brim.runtime.planner.lengths import derive_max_model_len, parse_token_count
from brim.runtime.planner.memory import Plan, PlanRequest, plan
from brim.runtime.planner.report import MemoryReport, MemoryUse

__all__ = ["CheckpointFacts", "MemoryReport", "MemoryUse", "ModelFacts", "Plan", "PlanRequest",
           "derive_max_model_len", "lookup_gpu", "model_facts", "parse_memory",
           "parse_token_count", "plan", "read_checkpoint"]
