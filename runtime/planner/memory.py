"""The memory model: what one GPU holds besides the KV cache, and the plan of what fits.

    budget         = total memory x gpu_memory_utilization
    non-KV         = weights + non-torch + activations + CUDA graphs
    num_gpu_blocks = floor((budget - non-KV) / (block_size x kv_bytes_per_token))
    fits           = num_gpu_blocks >= ceil(max_model_len / block_size) x min_concurrency

`plan(PlanRequest(...))` predicts it before anything starts; the engine measures the same
quantities at start-up and reports both side by side (report.MemoryReport).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from brim.runtime.planner.dtypes import (KV_CACHE_DTYPE_BYTES, MODEL_DTYPE_BYTES, resolve_dtype,
                                         resolve_kv_cache_dtype)
from brim.runtime.planner.facts import (TENSOR_PARALLEL_SIZES, CheckpointFacts, ModelFacts,
                                        vocab_rows_per_gpu)
from brim.runtime.planner.lengths import (DEFAULT_MAX_NUM_SEQS, default_max_num_batched_tokens,
                                          is_auto, max_model_len_of, parse_token_count)
from brim.runtime.planner.quantization import (QuantizationSpec, dequant_workspace_bytes,
                                               resolve_quantization)
from brim.runtime.planner.report import MemoryUse

MiB = 2**20
GiB = 2**30

# -- overheads: what a GPU holds besides weights and KV cache ----------------------------------
#
# Calibrated with bench/sizing_accuracy.py on an H100 80GB HBM3 (driver 580.159, torch 2.11
# + CUDA 13.0, 2026-11-23; docs/benchmarks.md): 12 engine start-ups of 3 model shapes, each
# measuring what the constants below predict. Change a figure and its comment together, and
# the table in docs/sizing.md with them.
#
# Memory the process holds outside torch's allocator (CUDA context, driver and runtime,
# loaded CUDA-library and Triton module images): measured 1.274 GiB in every run, whatever
# the model. Split as context plus library images so that other GPUs can be recalibrated.
CUDA_CONTEXT_BYTES = 1088 * MiB
LIBRARY_WORKSPACE_BYTES = 224 * MiB
# Allocated by torch's caching allocator once the first matmul runs: cuBLAS's workspace.
# Measured as the constant in peak = c + tokens x per-token bytes (33.8 MB on the H100).
CUBLAS_WORKSPACE_BYTES = 32 * MiB
# NCCL buffers per peer when TP > 1: NCCL_BUFFSIZE (4 MiB) x channels (up to 32 on NVLink),
# per the NCCL environment-variable docs: 128 MiB per peer. Not yet measured on a GPU (brim's
# TP has run on CPU with gloo only, whose buffers are not in this figure).
NCCL_BYTES_PER_PEER = 128 * MiB
# Bytes per logit the sampler holds beyond the lm_head's output: float32 logits, sort
# values and order, probabilities. Measured 20-20.2 bytes (SmolLM2's 49152 and Llama-3's
# 128256 vocabularies, 256 sampled rows).
SAMPLER_BYTES_PER_LOGIT = 20
# CUDA graphs (only when the engine captures them): per captured batch size and layer, the
# graph's nodes and private pool bookkeeping. vLLM logs ~0.3-0.6 GiB of graph memory for 8B
# models with ~67 sizes x 32 layers, about 256 KiB each. Awaits calibration.
CUDA_GRAPH_BYTES_PER_LAYER_PER_GRAPH = 256 * 2**10
CUDA_GRAPH_MAX_BATCH = 512  # vLLM's largest captured decode batch

# CPU serving (spec.device cpu): the runtime process besides weights, KV cache and activations
# (Python, torch, the tokenizers, the HTTP server). Measured on the bundled SmolLM2 with
# `brim serve --device cpu` (x86-64, torch 2.13.0 CPU, 2026-11-28): RSS 1.06 GiB at start with
# 0.50 GiB of weights and 0.04 GiB of KV cache; rounded up to leave the allocator room.
CPU_RUNTIME_BYTES = 768 * MiB

# The engine's defaults, which the planner assumes when not told otherwise.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
MAX_GPU_MEMORY_UTILIZATION = 0.95  # the most "auto" chooses: leaves room for fragmentation
DEFAULT_BLOCK_SIZE = 16


def activation_bytes(facts: ModelFacts, dtype_bytes: int, num_tokens: int, num_logit_rows: int,
                     tensor_parallel_size: int = 1, workspace_bytes: int = CUBLAS_WORKSPACE_BYTES
                     ) -> int:
    """Peak torch memory of one forward of num_tokens tokens, beyond the weights.

    The larger of a decoder layer's peak and the logits' peak (layer temporaries are freed
    before the logits are computed). Per layer, with T tokens and widths per GPU:
      attention: residual + normed input [T, h], qkv and its rotated copy [T, q + 2kv] x 2,
                 attention output [T, q]
      RMSNorm:   input [T, h] plus its float32 upcast and normalised copy [T, h] x 2 x 4 bytes
      MLP:       the layer's input, the residual and the normed input [T, h] x 3, gate_up
                 [T, 2I], silu(gate) and product [T, I] each (gated); up and activation
                 [T, I] each (ungated). Measured: exactly 3h + 4I per token on the H100.
    Logits: final hidden [T, h], lm_head output [rows, V] in the model dtype, and the sampler's
    float32 work (SAMPLER_BYTES_PER_LOGIT per logit), rows = tokens that sample. Plus
    cuBLAS's workspace (workspace_bytes), which torch's allocator holds from the first matmul
    on (none on CPU).
    """
    tp = tensor_parallel_size
    h, d = facts.hidden_size, facts.head_dim
    q = facts.num_attention_heads * d // tp
    kv = facts.num_kv_heads_per_gpu(tp) * d
    inter = facts.intermediate_size // tp
    attention = (2 * h + 2 * (q + 2 * kv) + q) * dtype_bytes
    norm = h * dtype_bytes + 2 * h * 4
    mlp = (3 * h + (4 if facts.is_gated_mlp else 2) * inter) * dtype_bytes
    layer_peak = num_tokens * max(attention, norm, mlp)
    logits_peak = (num_tokens * h * dtype_bytes
                   + num_logit_rows * facts.vocab_size * (dtype_bytes + SAMPLER_BYTES_PER_LOGIT))
    return workspace_bytes + max(layer_peak, logits_peak)


def rope_table_bytes(facts: ModelFacts) -> int:
    """brim's rotary cos/sin table, float32 [max_position_embeddings, 2, head_dim], built
    beside the weights at load (0 for learned absolute positions)."""
    if facts.num_learned_positions:
        return 0
    return facts.max_position_embeddings * 2 * facts.head_dim * 4


def non_torch_bytes(tensor_parallel_size: int) -> int:
    """CUDA context and library workspaces; NCCL buffers for each peer when TP > 1."""
    return (CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES
            + NCCL_BYTES_PER_PEER * (tensor_parallel_size - 1))


def cuda_graph_bytes(facts: ModelFacts, max_num_seqs: int) -> int:
    """Memory of CUDA graphs captured for decode batches 1, 2, 4, 8, 16, ... max_num_seqs."""
    largest = min(max_num_seqs, CUDA_GRAPH_MAX_BATCH)
    sizes = [s for s in (1, 2, 4) if s <= largest] + list(range(8, largest + 1, 8))
    return len(sizes) * facts.num_layers * CUDA_GRAPH_BYTES_PER_LAYER_PER_GRAPH


def linear_shapes(facts: ModelFacts, tensor_parallel_size: int = 1) -> list[tuple[int, int]]:
    """(out_features, in_features) per GPU of one decoder layer's projections, fused as brim
    serves them: qkv, o, gate_up (or up), down."""
    tp = tensor_parallel_size
    h, d = facts.hidden_size, facts.head_dim
    q = facts.num_attention_heads * d // tp
    kv = facts.num_kv_heads_per_gpu(tp) * d
    inter = facts.intermediate_size // tp
    return [(q + 2 * kv, h), (h, q), ((2 if facts.is_gated_mlp else 1) * inter, h), (h, inter)]


def weights_bytes_from_config(facts: ModelFacts, dtype_bytes: int,
                              tensor_parallel_size: int = 1,
                              quantization: QuantizationSpec | None = None) -> int:
    """Weight bytes per GPU implied by config.json's shapes (ModelFacts.num_parameters).

    Quantized: the decoder projections at bits/8 bytes per weight, plus per group a scale
    (dtype) and a packed zero (GPTQ/AWQ), or per output channel a float32 scale (FP8).
    """
    total = facts.num_parameters_per_gpu(tensor_parallel_size) * dtype_bytes
    if quantization is None:
        return total
    for n, k in linear_shapes(facts, tensor_parallel_size):
        packed = n * k * quantization.bits // 8
        if quantization.method == "fp8":
            extra = n * 4
        else:
            groups = -(-k // (k if quantization.group_size == -1 else quantization.group_size))
            extra = groups * n * (dtype_bytes + quantization.bits / 8)
        total += facts.num_layers * int(packed + extra - n * k * dtype_bytes)
    return total


def weights_bytes_per_gpu(checkpoint: CheckpointFacts, dtype_bytes: int,
                          tensor_parallel_size: int = 1,
                          quantization: QuantizationSpec | None = None) -> tuple[int, str]:
    """(weight bytes per GPU, source): exact from the safetensors headers ("safetensors")
    when they were read, else from config.json's parameter count ("config")."""
    exact = checkpoint.checkpoint_weights_bytes(dtype_bytes, tensor_parallel_size, quantization)
    if exact is not None:
        return exact, "safetensors"
    return (weights_bytes_from_config(checkpoint.model, dtype_bytes, tensor_parallel_size,
                                      quantization), "config")


# -- the request and the plan ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What to plan: a model, one GPU's memory and the engine's settings (vLLM's names).

    checkpoint: the model's facts (facts.read_checkpoint, or CheckpointFacts(config=...)).
    gpu_memory_bytes: total memory of one GPU.
    gpu_memory_utilization: share of it the engine may use, or "auto": the smallest (in steps
        of 0.01, at most MAX_GPU_MEMORY_UTILIZATION) that fits max_model_len min_concurrency
        times.
    tensor_parallel_size: GPUs per replica, or "auto": the smallest of 1, 2, 4, 8 dividing the
        attention and KV heads, at most num_gpus, that fits.
    max_model_len: None takes the model's derived maximum; "auto" the largest that fits
        (capped by the derived maximum); else a count ("32k").
    min_model_len: with max_model_len "auto", the least it may settle for: a plan whose
        longest fitting length is shorter does not fit.
    max_num_batched_tokens: tokens per step; None applies the engine's default for the device.
    min_concurrency: requests of max_model_len that must fit at once.
    num_gpus: GPUs available to one replica (bounds "auto" tensor parallelism).
    enforce_eager: brim's engine does not capture CUDA graphs yet; False adds their memory.
    extra_non_kv_bytes: memory a running engine measured beyond this model's prediction (the
        operator feeds a failed pod's report back), added to the non-KV memory.
    device: "cuda" plans one GPU's memory; "cpu" plans a CPU runtime's memory
        (gpu_memory_bytes is then the container's memory).
    quantization: None serves the checkpoint as declared (quantized or not); "fp8"
        quantizes a plain checkpoint's projections while loading (planner.quantization).
    """

    checkpoint: CheckpointFacts
    gpu_memory_bytes: int
    gpu_memory_utilization: float | str = DEFAULT_GPU_MEMORY_UTILIZATION
    tensor_parallel_size: int | str = 1
    max_model_len: int | str | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    min_concurrency: int = 1
    num_gpus: int | None = None
    enforce_eager: bool = True
    min_model_len: int | str | None = None
    extra_non_kv_bytes: int = 0
    device: str = "cuda"
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.min_concurrency < 1:
            raise ValueError(f"min_concurrency must be >= 1, got {self.min_concurrency}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.extra_non_kv_bytes < 0:
            raise ValueError(f"extra_non_kv_bytes must be >= 0, got {self.extra_non_kv_bytes}")
        if not is_auto(self.gpu_memory_utilization):
            util = float(self.gpu_memory_utilization)
            if not 0 < util <= 1:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1] or 'auto', got {util}")


@dataclass(frozen=True, slots=True)
class Plan:
    """What fits on each GPU of a tensor-parallel group, and why. Bytes are per GPU.

    non_kv_bytes = weights_bytes + non_torch_bytes + activation_bytes + cuda_graph_bytes.
    num_gpu_blocks: KV blocks in what total x gpu_memory_utilization leaves after non-KV.
    kv_cache_tokens = num_gpu_blocks x block_size.
    max_concurrency: requests of max_model_len tokens the cache holds at once.
    fits: max_model_len fits min_concurrency times (and is at least min_model_len when it
        was "auto"); messages say why not and what would fit.
    extra_non_kv_bytes: measured memory beyond the model's prediction, included in
        non_kv_bytes (PlanRequest.extra_non_kv_bytes).
    """

    gpu_memory_bytes: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    derived_max_model_len: int
    max_model_len: int
    min_concurrency: int
    kv_bytes_per_token: int
    weights_bytes: int
    weights_source: str  # "safetensors" (exact, from headers) or "config" (parameter count)
    # weights_bytes counts brim's RoPE cos/sin table too (rope_table_bytes), as the engine's
    # measurement does.
    non_torch_bytes: int
    activation_bytes: int
    cuda_graph_bytes: int
    non_kv_bytes: int
    kv_cache_bytes: int
    num_gpu_blocks: int
    kv_cache_tokens: int
    max_concurrency: int
    fits: bool
    messages: tuple[str, ...] = ()
    device: str = "cuda"
    min_model_len: int | None = None
    extra_non_kv_bytes: int = 0
    quantization: str | None = None  # the scheme served (QuantizationSpec.describe())

    def concurrency_at(self, num_tokens: int) -> int:
        """Requests of num_tokens tokens the KV cache holds at once."""
        return self.num_gpu_blocks // -(-num_tokens // self.block_size)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["messages"] = list(self.messages)
        return out

    def memory_use(self) -> MemoryUse:
        """The prediction in the memory report's terms (the engine measures the same names)."""
        return MemoryUse(gpu_memory_bytes=self.gpu_memory_bytes,
                         gpu_memory_utilization=self.gpu_memory_utilization,
                         weights_bytes=self.weights_bytes, activation_bytes=self.activation_bytes,
                         non_torch_bytes=self.non_torch_bytes, non_kv_bytes=self.non_kv_bytes,
                         num_gpu_blocks=self.num_gpu_blocks)


@dataclass(frozen=True, slots=True)
class _Inputs:
    """A PlanRequest resolved against its model: what every candidate plan shares."""

    request: PlanRequest
    facts: ModelFacts
    derived_max_model_len: int
    requested_len: int
    is_auto_len: bool
    min_len: int | None
    dtype: str
    kv_cache_dtype: str
    num_batched_tokens: int
    quantization: QuantizationSpec | None = None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB"


def plan(request: PlanRequest) -> Plan:
    """Predict what fits before anything starts; when nothing does, say what would."""
    inputs = _resolve(request)
    facts = inputs.facts
    if is_auto(request.tensor_parallel_size):
        num_gpus = request.num_gpus
        candidates = [tp for tp in TENSOR_PARALLEL_SIZES
                      if facts.num_kv_heads % tp == 0 and facts.num_attention_heads % tp == 0
                      and (num_gpus is None or tp <= num_gpus)] or [1]
    else:
        tp = int(request.tensor_parallel_size)
        facts.check_tensor_parallel_size(tp)
        candidates = [tp]
    result = None
    for tp in candidates:
        result = _plan_one(inputs, tp, request.gpu_memory_utilization)
        if result.fits:
            return result
    advice = _advise(result, inputs)
    return replace(result, messages=result.messages + tuple(advice))


def _resolve(request: PlanRequest) -> _Inputs:
    checkpoint = request.checkpoint
    facts = checkpoint.model
    derived = max_model_len_of(facts.length, checkpoint.tokenizer_max_length)
    is_auto_len = is_auto(request.max_model_len)
    if request.max_model_len is None or is_auto_len:
        requested_len = derived
    else:
        requested_len = parse_token_count(request.max_model_len)
    device = request.device
    if request.max_num_batched_tokens is None:  # the engine's default
        num_tokens = default_max_num_batched_tokens(device, request.max_num_seqs, requested_len)
    else:
        num_tokens = parse_token_count(request.max_num_batched_tokens)
    min_len = (None if request.min_model_len is None
               else parse_token_count(request.min_model_len))
    dtype = resolve_dtype(request.dtype, facts.checkpoint_dtype, device)
    return _Inputs(request=request, facts=facts, derived_max_model_len=derived,
                   requested_len=requested_len, is_auto_len=is_auto_len, min_len=min_len,
                   dtype=dtype,
                   kv_cache_dtype=resolve_kv_cache_dtype(request.kv_cache_dtype, dtype),
                   num_batched_tokens=num_tokens,
                   quantization=resolve_quantization(request.quantization, checkpoint.config))


def _auto_utilization(needed: int, total: int) -> float:
    """The smallest share (in hundredths, at most the maximum) whose budget holds `needed`."""
    util = min(max(math.ceil(needed * 100 / total) / 100, 0.01), MAX_GPU_MEMORY_UTILIZATION)
    while util < MAX_GPU_MEMORY_UTILIZATION and int(total * util) < needed:
        util = round(util + 0.01, 2)  # float rounding of total x util
    return util


def _plan_one(inputs: _Inputs, tp: int, utilization: float | str) -> Plan:
    request, facts = inputs.request, inputs.facts
    total = int(request.gpu_memory_bytes)
    block_size, min_concurrency = request.block_size, request.min_concurrency
    derived, num_tokens = inputs.derived_max_model_len, inputs.num_batched_tokens
    dtype_bytes = MODEL_DTYPE_BYTES[inputs.dtype]

    on_cpu = request.device == "cpu"
    weights, source = weights_bytes_per_gpu(request.checkpoint, dtype_bytes, tp,
                                            inputs.quantization)
    weights += rope_table_bytes(facts)
    if on_cpu and facts.tie_word_embeddings:
        # The CPU runtime packs the output projection for oneDNN (models/cpu_linear.py): a
        # tied embedding (each rank's vocabulary shard under TP) is then held twice.
        weights += vocab_rows_per_gpu(facts.vocab_size, tp) * facts.hidden_size * dtype_bytes
    non_torch = CPU_RUNTIME_BYTES if on_cpu else non_torch_bytes(tp)
    activations = activation_bytes(facts, dtype_bytes, num_tokens,
                                   min(request.max_num_seqs, num_tokens), tp,
                                   workspace_bytes=0 if on_cpu else CUBLAS_WORKSPACE_BYTES)
    activations += dequant_workspace_bytes(inputs.quantization, linear_shapes(facts, tp),
                                           dtype_bytes, request.device)
    graphs = 0 if request.enforce_eager or on_cpu else cuda_graph_bytes(facts,
                                                                        request.max_num_seqs)
    non_kv = weights + non_torch + activations + graphs + request.extra_non_kv_bytes

    kv_per_token = facts.kv_bytes_per_token(KV_CACHE_DTYPE_BYTES[inputs.kv_cache_dtype], tp)
    block_bytes = kv_per_token * block_size
    needed_blocks = -(-inputs.requested_len // block_size) * min_concurrency
    if is_auto(utilization):
        util = _auto_utilization(non_kv + needed_blocks * block_bytes, total)
    else:
        util = float(utilization)
    budget = int(total * util)
    num_blocks = max(0, (budget - non_kv) // block_bytes)

    max_len = inputs.requested_len
    if inputs.is_auto_len:
        max_len = min(derived, (num_blocks // min_concurrency) * block_size)
    fits = max_len > 0 and num_blocks >= -(-max_len // block_size) * min_concurrency
    messages = []
    where = "CPU" if on_cpu else f"{tp} GPU(s)"
    below_min = inputs.is_auto_len and inputs.min_len is not None and max_len < inputs.min_len
    if below_min:
        fits = False
    elif max_len > derived:
        fits = False
        messages.append(f"max_model_len={max_len} is longer than the model's maximum of "
                        f"{derived} tokens (derived from config.json); lower it to {derived}")
    if fits:
        messages.append(
            f"fits: max_model_len={max_len} on {where} x {_gib(total)} at "
            f"gpu_memory_utilization={util:.2f}: {num_blocks} blocks of {block_size} tokens, "
            f"{num_blocks * block_size // max_len} requests of {max_len} tokens at once")
    elif budget < non_kv:
        messages.append(
            f"does not fit: non-KV memory needs {_gib(non_kv)} per "
            f"{'CPU runtime' if on_cpu else 'GPU'} (weights "
            f"{_gib(weights)}, activations {_gib(activations)}, non-torch {_gib(non_torch)}) "
            f"but the budget is {_gib(budget)} ({_gib(total)} x {util:.2f})")
    elif below_min:
        messages.append(
            f"does not fit: the longest max_model_len that fits is {max_len}, below "
            f"min_model_len={inputs.min_len} ({num_blocks} blocks of {block_size} tokens fit "
            f"in {_gib(budget)} ({_gib(total)} x {util:.2f}) after {_gib(non_kv)} of non-KV "
            "memory)")
    elif max_len <= derived:
        shown_len = max_len if max_len > 0 else block_size
        shown_blocks = -(-shown_len // block_size) * min_concurrency
        messages.append(
            f"does not fit: max_model_len={shown_len} x {min_concurrency} needs "
            f"{shown_blocks} blocks ({_gib(shown_blocks * block_bytes)} of KV cache)"
            f" but only {num_blocks} blocks ({_gib(num_blocks * block_bytes)}) fit in "
            f"{_gib(budget)} ({_gib(total)} x {util:.2f}) after {_gib(non_kv)} of non-KV memory")
    return Plan(
        gpu_memory_bytes=total, gpu_memory_utilization=util, tensor_parallel_size=tp,
        dtype=inputs.dtype, kv_cache_dtype=inputs.kv_cache_dtype, block_size=block_size,
        max_num_seqs=request.max_num_seqs, max_num_batched_tokens=num_tokens,
        derived_max_model_len=derived, max_model_len=max_len, min_concurrency=min_concurrency,
        kv_bytes_per_token=kv_per_token, weights_bytes=weights, weights_source=source,
        non_torch_bytes=non_torch, activation_bytes=activations, cuda_graph_bytes=graphs,
        non_kv_bytes=non_kv, kv_cache_bytes=num_blocks * block_bytes, num_gpu_blocks=num_blocks,
        kv_cache_tokens=num_blocks * block_size,
        max_concurrency=num_blocks // -(-max_len // block_size) if max_len > 0 else 0,
        fits=fits, messages=tuple(messages), device=request.device, min_model_len=inputs.min_len,
        extra_non_kv_bytes=request.extra_non_kv_bytes,
        quantization=inputs.quantization.describe() if inputs.quantization else None,
    )


def _advise(failed: Plan, inputs: _Inputs) -> list[str]:
    """The nearest settings that would fit, each on its own."""
    advice = []
    request, facts = inputs.request, inputs.facts
    tp, conc = failed.tensor_parallel_size, failed.min_concurrency
    longest = min(failed.derived_max_model_len,
                  (failed.num_gpu_blocks // conc) * failed.block_size)
    if inputs.is_auto_len and inputs.min_len is not None:
        if longest > 0:
            advice.append(f"lower min_model_len to {longest}")
    elif failed.max_model_len <= failed.derived_max_model_len and longest > 0:
        advice.append(f"lower max_model_len to {longest}")
    utilization = request.gpu_memory_utilization
    if not is_auto(utilization):
        at_max = _plan_one(inputs, tp, "auto")
        if at_max.fits:
            advice.append(f"raise gpu_memory_utilization to {at_max.gpu_memory_utilization:.2f}")
    for larger in facts.tensor_parallel_sizes():
        if request.device == "cpu":
            break
        if larger <= tp or (request.num_gpus or TENSOR_PARALLEL_SIZES[-1]) < larger:
            continue
        if _plan_one(inputs, larger, utilization).fits:
            advice.append(f"use tensor_parallel_size={larger}")
            break
    if not inputs.kv_cache_dtype.startswith("fp8"):
        if _plan_one(replace(inputs, kv_cache_dtype="fp8"), tp, utilization).fits:
            advice.append("use kv_cache_dtype=fp8")
    if not advice:
        advice.append("no single change fits: use a GPU with more memory or a smaller model")
    return advice
