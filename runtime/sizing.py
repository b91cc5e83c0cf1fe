"""The memory model: what fits, and why.

Torch-free on purpose: the operator image imports this module without torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from brim.runtime.model_facts import (ModelFacts, model_facts, read_safetensors_header,
                                      safetensors_files, sliding_window_of, tensor_bytes_per_gpu)

__all__ = ["MAX_LEN_KEYS", "ModelFacts", "derive_max_model_len", "model_facts",
           "parse_token_count", "sliding_window_of"]

logger = logging.getLogger(__name__)

# Keys that bound a model's context, in the naming schemes of the families we read.
MAX_LEN_KEYS = (
    "max_position_embeddings",  # Llama, Mistral, Qwen2, Gemma, Phi-3, Falcon
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM
    "model_max_length",
    "max_target_positions",  # Whisper's decoder
)
DEFAULT_MAX_MODEL_LEN = 2048

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*$")
_MULTIPLIER = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_token_count(value: int | str) -> int:
    """Parse a human-readable token count: `1k` = 1000, `1K` = 1024, `25.6k` = 25600.

    Lower-case suffixes (k, m, g) are decimal, upper-case (K, M, G) binary.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a token count, got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = _COUNT.match(str(value))
        if not match:
            raise ValueError(
                f"cannot read {value!r} as a token count; use an integer or a number with a "
                "suffix: k/m/g (x1000) or K/M/G (x1024), e.g. '25.6k' or '32K'"
            )
        number, suffix = match.groups()
        exact = float(number) * _MULTIPLIER[suffix]
        count = round(exact)
        if not math.isclose(exact, count, abs_tol=1e-6):
            raise ValueError(f"{value!r} is {exact} tokens, not a whole number of tokens")
    if count <= 0:
        raise ValueError(f"a token count must be positive, got {value!r}")
    return count


def _rope_scaling(hf_config: dict) -> dict | None:
    # transformers < 5 writes `rope_scaling`; 5.x writes `rope_parameters` (always present,
    # with rope_type "default" when unscaled), nested per layer type for Gemma 2/3-style
    # models ({"full_attention": {...}, "sliding_attention": {...}}).
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters")
    if not isinstance(scaling, dict) or not scaling:
        return None
    if "full_attention" in scaling and isinstance(scaling["full_attention"], dict):
        scaling = scaling["full_attention"]
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return None if rope_type == "default" else {**scaling, "rope_type": rope_type}


def derive_max_model_len(
    hf_config: dict,
    tokenizer_config: dict | None = None,
    *,
    disable_sliding_window: bool = False,
) -> int:
    """The longest context the model supports, as vLLM derives it.

    In vLLM's order: the smallest length key present in config.json; a sliding window caps
    it when sliding window is disabled; 2048 with a warning when nothing says; RoPE scaling
    applied (linear, dynamic and yarn multiply by the factor, yarn from
    `original_max_position_embeddings`; llama3 and longrope keep `max_position_embeddings`,
    which already states the scaled length); the tokenizer's `model_max_length` caps it.
    """
    text = hf_config.get("text_config")
    if isinstance(text, dict) and not any(hf_config.get(k) for k in MAX_LEN_KEYS):
        hf_config = text  # multimodal wrappers keep the language model's lengths inside
    present = [(key, int(hf_config[key])) for key in MAX_LEN_KEYS if hf_config.get(key)]
    max_len = min((length for _, length in present), default=None)

    window = sliding_window_of(hf_config)
    if disable_sliding_window and window is not None:
        max_len = window if max_len is None else min(max_len, window)

    if max_len is None:
        max_len = DEFAULT_MAX_MODEL_LEN
        logger.warning(
            "config.json names none of %s; assuming max_model_len=%d",
            ", ".join(MAX_LEN_KEYS),
            DEFAULT_MAX_MODEL_LEN,
        )

    scaling = _rope_scaling(hf_config)
    # Gemma 3's rope_scaling applies to its global layers only; vLLM leaves its length alone.
    if scaling and "gemma3" not in str(hf_config.get("model_type", "")):
        rope_type = scaling["rope_type"]
        if rope_type in ("linear", "dynamic", "yarn"):
            factor = float(scaling.get("factor", 1.0))
            if rope_type == "yarn" and "original_max_position_embeddings" in scaling:
                max_len = int(scaling["original_max_position_embeddings"])
            max_len = int(max_len * factor)
        # llama3, longrope, su, mrope: max_position_embeddings is already the scaled length.

    if tokenizer_config:
        tokenizer_max = tokenizer_config.get("model_max_length")
        # tokenizers without a limit store a huge sentinel (int(1e30)).
        if isinstance(tokenizer_max, (int, float)) and 0 < tokenizer_max < 10**12:
            max_len = min(max_len, int(tokenizer_max))
    return max_len


# -- bytes per token and per weight ----------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_CACHE_DTYPE_BYTES = {**DTYPE_BYTES, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
_KV_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
               "float": "float32"}


def resolve_dtype(dtype: str, hf_config: dict) -> str:
    """The dtype the CUDA engine serves in: `auto` takes the checkpoint's (engine's own rule)."""
    from brim.runtime.config import normalize_dtype  # config imports this module

    return normalize_dtype(dtype, hf_config, "cuda")


def resolve_kv_cache_dtype(kv_cache_dtype: str, hf_config: dict, dtype: str = "auto") -> str:
    """`auto` stores the KV cache in the model's dtype; fp8 variants take one byte."""
    name = _KV_ALIASES.get(str(kv_cache_dtype).lower(), str(kv_cache_dtype).lower())
    if name == "auto":
        return resolve_dtype(dtype, hf_config)
    if name not in KV_CACHE_DTYPE_BYTES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPE_BYTES)};"
                         f" got {kv_cache_dtype!r}")
    return name


def kv_cache_bytes_per_token(hf_config: dict, kv_cache_dtype: str = "auto",
                             tensor_parallel_size: int = 1) -> int:
    """Bytes one token's K and V take on one GPU, over all layers.

    2 (K and V) x layers x KV heads per GPU x head_dim x element bytes. With more GPUs than
    KV heads each GPU keeps one head (vLLM replicates KV heads rather than splitting one).
    """
    facts = model_facts(hf_config)
    element_bytes = KV_CACHE_DTYPE_BYTES[resolve_kv_cache_dtype(kv_cache_dtype, hf_config)]
    kv_heads_per_gpu = max(1, facts.num_kv_heads // tensor_parallel_size)
    return 2 * facts.num_layers * kv_heads_per_gpu * facts.head_dim * element_bytes


def weights_bytes_from_safetensors(checkpoint_dir: str | os.PathLike, hf_config: dict, *,
                                   dtype: str = "auto", tensor_parallel_size: int = 1) -> int | None:
    """Exact weight bytes per GPU from the safetensors headers (no tensor is read).

    Floating tensors are counted in the serving dtype; None when the folder has no safetensors.
    """
    files = safetensors_files(checkpoint_dir)
    if not files:
        return None
    dtype_bytes = DTYPE_BYTES[resolve_dtype(dtype, hf_config)]
    num_kv_heads = model_facts(hf_config).num_kv_heads
    return sum(tensor_bytes_per_gpu(tensor, dtype_bytes, tensor_parallel_size, num_kv_heads)
               for path in files for tensor in read_safetensors_header(path))


def weights_bytes_from_config(hf_config: dict, *, dtype: str = "auto",
                              tensor_parallel_size: int = 1) -> int:
    """Weight bytes per GPU implied by config.json's shapes (see ModelFacts.num_parameters)."""
    dtype_bytes = DTYPE_BYTES[resolve_dtype(dtype, hf_config)]
    return model_facts(hf_config).num_parameters_per_gpu(tensor_parallel_size) * dtype_bytes


def weights_bytes_per_gpu(hf_config: dict, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                          checkpoint_dir: str | os.PathLike | None = None) -> int:
    """Weight bytes per GPU: from the safetensors headers when present, else from config.json."""
    if checkpoint_dir is not None:
        exact = weights_bytes_from_safetensors(checkpoint_dir, hf_config, dtype=dtype,
                                               tensor_parallel_size=tensor_parallel_size)
        if exact is not None:
            return exact
    return weights_bytes_from_config(hf_config, dtype=dtype,
                                     tensor_parallel_size=tensor_parallel_size)


# -- overheads: what a GPU holds besides weights and KV cache ----------------------------------
#
# None of these is calibrated yet: no GPU was available when they were written. Each states its
# source; bench/sizing_accuracy.py compares the plan with the runtime's measurement and is how
# they get calibrated (update the figure and its comment together).

MiB = 2**20
GiB = 2**30

# Calibrated with bench/sizing_accuracy.py on an H100 80GB HBM3 (driver 580.159, torch 2.11
# + CUDA 13.0, 2026-11-23; docs/benchmarks.md): 12 engine start-ups of 3 model shapes, each
# measuring what the constants below predict.
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
# per the NCCL environment-variable docs: 128 MiB per peer. Not measured (brim runs TP=1).
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

DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
MAX_GPU_MEMORY_UTILIZATION = 0.95
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # the CUDA engine's default (config.py)
TENSOR_PARALLEL_CANDIDATES = (1, 2, 4, 8)


def activation_bytes(facts: ModelFacts, dtype_bytes: int, num_tokens: int, num_logit_rows: int,
                     tensor_parallel_size: int = 1) -> int:
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
    cuBLAS's workspace, which torch's allocator holds from the first matmul on.
    """
    tp = tensor_parallel_size
    h, d = facts.hidden_size, facts.head_dim
    q = facts.num_attention_heads * d // tp
    kv = max(1, facts.num_kv_heads // tp) * d
    inter = facts.intermediate_size // tp
    attention = (2 * h + 2 * (q + 2 * kv) + q) * dtype_bytes
    norm = h * dtype_bytes + 2 * h * 4
    mlp = (3 * h + (4 if facts.is_gated_mlp else 2) * inter) * dtype_bytes
    layer_peak = num_tokens * max(attention, norm, mlp)
    logits_peak = (num_tokens * h * dtype_bytes
                   + num_logit_rows * facts.vocab_size * (dtype_bytes + SAMPLER_BYTES_PER_LOGIT))
    return CUBLAS_WORKSPACE_BYTES + max(layer_peak, logits_peak)


def rope_table_bytes(hf_config: dict, facts: ModelFacts) -> int:
    """brim's rotary cos/sin table, float32 [max_position_embeddings, 2, head_dim], built
    beside the weights at load (0 for learned absolute positions)."""
    if facts.num_learned_positions:
        return 0
    return int(hf_config.get("max_position_embeddings") or 4096) * 2 * facts.head_dim * 4


def non_torch_bytes(tensor_parallel_size: int) -> int:
    """CUDA context and library workspaces; NCCL buffers for each peer when TP > 1."""
    return (CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES
            + NCCL_BYTES_PER_PEER * (tensor_parallel_size - 1))


def cuda_graph_bytes(facts: ModelFacts, max_num_seqs: int) -> int:
    """Memory of CUDA graphs captured for decode batches 1, 2, 4, 8, 16, ... max_num_seqs."""
    largest = min(max_num_seqs, CUDA_GRAPH_MAX_BATCH)
    sizes = [s for s in (1, 2, 4) if s <= largest] + list(range(8, largest + 1, 8))
    return len(sizes) * facts.num_layers * CUDA_GRAPH_BYTES_PER_LAYER_PER_GRAPH


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What fits on each GPU of a tensor-parallel group, and why. Bytes are per GPU.

    non_kv_bytes = weights_bytes + non_torch_bytes + activation_bytes + cuda_graph_bytes.
    num_gpu_blocks: KV blocks in what total x gpu_memory_utilization leaves after non-KV.
    kv_cache_tokens = num_gpu_blocks x block_size.
    max_concurrency: requests of max_model_len tokens the cache holds at once.
    fits: max_model_len fits min_concurrency times; messages say why not and what would fit.
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

    def concurrency_at(self, num_tokens: int) -> int:
        """Requests of num_tokens tokens the KV cache holds at once."""
        return self.num_gpu_blocks // -(-num_tokens // self.block_size)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["messages"] = list(self.messages)
        return out


def _load_model(model) -> tuple[dict, Path | None, dict | None]:
    """(config.json, checkpoint folder or None, tokenizer_config.json or None) for a model."""
    if isinstance(model, dict):
        return model, None, None
    path = Path(model)
    if path.is_file():
        return json.loads(path.read_text()), None, None
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a checkpoint folder holding "
                                "config.json (and safetensors files) or a config.json file")
    tokenizer = path / "tokenizer_config.json"
    return (json.loads(config.read_text()), path,
            json.loads(tokenizer.read_text()) if tokenizer.is_file() else None)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB"


def plan(
    model: str | os.PathLike | dict,
    *,
    gpu_memory_bytes: int,
    gpu_memory_utilization: float | str = DEFAULT_GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: int | str = 1,
    max_model_len: int | str | None = None,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens: int | str | None = None,
    block_size: int = 16,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    min_concurrency: int = 1,
    num_gpus: int | None = None,
    enforce_eager: bool = True,
    tokenizer_config: dict | None = None,
) -> Plan:
    """Predict what fits before anything starts.

    model: a checkpoint folder (config.json, optional tokenizer_config.json and safetensors),
        a config.json path, or config.json as a dict.
    gpu_memory_bytes: total memory of one GPU.
    gpu_memory_utilization: share of it the engine may use, or "auto": the smallest (in steps
        of 0.01, at most 0.95) that fits max_model_len min_concurrency times.
    tensor_parallel_size: GPUs per replica, or "auto": the smallest of 1, 2, 4, 8 dividing the
        attention and KV heads, at most num_gpus, that fits.
    max_model_len: None takes the model's derived maximum; "auto" the largest that fits
        (capped by the derived maximum); else a count ("32k").
    max_num_batched_tokens: tokens per step; None applies the engine's default.
    enforce_eager: brim's engine does not capture CUDA graphs yet; False adds their memory.
    """
    hf_config, checkpoint_dir, found_tokenizer_config = _load_model(model)
    tokenizer_config = tokenizer_config or found_tokenizer_config
    facts = model_facts(hf_config)
    derived = derive_max_model_len(hf_config, tokenizer_config)
    if max_model_len in (None, "auto"):
        requested_len = derived
    else:
        requested_len = parse_token_count(max_model_len)
    if tensor_parallel_size == "auto":
        candidates = [tp for tp in TENSOR_PARALLEL_CANDIDATES
                      if facts.num_kv_heads % tp == 0 and facts.num_attention_heads % tp == 0
                      and (num_gpus is None or tp <= num_gpus)] or [1]
    else:
        tp = int(tensor_parallel_size)
        if tp < 1 or facts.num_attention_heads % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must be >= 1 and divide the model's "
                f"{facts.num_attention_heads} attention heads; use one of "
                f"{[n for n in TENSOR_PARALLEL_CANDIDATES if facts.num_attention_heads % n == 0]}"
                " or 'auto'")
        candidates = [tp]
    if min_concurrency < 1:
        raise ValueError(f"min_concurrency must be >= 1, got {min_concurrency}")
    settings = dict(
        hf_config=hf_config, facts=facts, checkpoint_dir=checkpoint_dir, derived=derived,
        gpu_memory_bytes=int(gpu_memory_bytes), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
        dtype=resolve_dtype(dtype, hf_config), min_concurrency=min_concurrency,
        enforce_eager=enforce_eager, is_auto_len=max_model_len == "auto",
        requested_len=requested_len,
    )
    settings["kv_cache_dtype"] = resolve_kv_cache_dtype(kv_cache_dtype, hf_config,
                                                        settings["dtype"])
    result = None
    for tp in candidates:
        result = _plan_one(tensor_parallel_size=tp, utilization=gpu_memory_utilization,
                           **settings)
        if result.fits:
            break
    if not result.fits:
        advice = _advise(result, settings, gpu_memory_utilization, candidates, num_gpus)
        result = _replace(result, messages=result.messages + tuple(advice))
    return result


def _replace(p: Plan, **changes) -> Plan:
    return Plan(**{**p.to_dict(), "messages": p.messages, **changes})


def _plan_one(*, hf_config, facts, checkpoint_dir, derived, gpu_memory_bytes, max_num_seqs,
              max_num_batched_tokens, block_size, dtype, kv_cache_dtype, min_concurrency,
              enforce_eager, is_auto_len, requested_len, tensor_parallel_size,
              utilization) -> Plan:
    tp = tensor_parallel_size
    total = gpu_memory_bytes
    if max_num_batched_tokens is None:  # the engine's default, as EngineConfig.create sets it
        num_tokens = max(max_num_seqs, min(DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                           max_num_seqs * requested_len))
    else:
        num_tokens = parse_token_count(max_num_batched_tokens)
    dtype_bytes = DTYPE_BYTES[dtype]

    weights = None
    if checkpoint_dir is not None:
        weights = weights_bytes_from_safetensors(checkpoint_dir, hf_config, dtype=dtype,
                                                 tensor_parallel_size=tp)
    source = "config" if weights is None else "safetensors"
    if weights is None:
        weights = weights_bytes_from_config(hf_config, dtype=dtype, tensor_parallel_size=tp)
    weights += rope_table_bytes(hf_config, facts)
    non_torch = non_torch_bytes(tp)
    activations = activation_bytes(facts, dtype_bytes, num_tokens,
                                   min(max_num_seqs, num_tokens), tp)
    graphs = 0 if enforce_eager else cuda_graph_bytes(facts, max_num_seqs)
    non_kv = weights + non_torch + activations + graphs

    kv_per_token = kv_cache_bytes_per_token(hf_config, kv_cache_dtype, tp)
    block_bytes = kv_per_token * block_size
    blocks_per_request = -(-requested_len // block_size)
    needed_blocks = blocks_per_request * min_concurrency
    if utilization == "auto":
        # The smallest share (in hundredths) whose budget holds non-KV plus the needed blocks.
        needed = non_kv + needed_blocks * block_bytes
        util = min(max(math.ceil(needed * 100 / total) / 100, 0.01), MAX_GPU_MEMORY_UTILIZATION)
        while util < MAX_GPU_MEMORY_UTILIZATION and int(total * util) < needed:
            util = round(util + 0.01, 2)  # float rounding of total x util
    else:
        util = float(utilization)
        if not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] or 'auto', got {util}")
    budget = int(total * util)
    num_blocks = max(0, (budget - non_kv) // block_bytes)

    max_len = requested_len
    if is_auto_len:
        max_len = min(derived, (num_blocks // min_concurrency) * block_size)
    fits = max_len > 0 and num_blocks >= -(-max_len // block_size) * min_concurrency
    messages = []
    if max_len > derived:
        fits = False
        messages.append(f"max_model_len={max_len} is longer than the model's maximum of "
                        f"{derived} tokens (derived from config.json); lower it to {derived}")
    if fits:
        messages.append(
            f"fits: max_model_len={max_len} on {tp} GPU(s) x {_gib(total)} at "
            f"gpu_memory_utilization={util:.2f}: {num_blocks} blocks of {block_size} tokens, "
            f"{num_blocks * block_size // max_len} requests of {max_len} tokens at once")
    elif budget < non_kv:
        messages.append(
            f"does not fit: non-KV memory needs {_gib(non_kv)} per GPU (weights "
            f"{_gib(weights)}, activations {_gib(activations)}, non-torch {_gib(non_torch)}) "
            f"but the budget is {_gib(budget)} ({_gib(total)} x {util:.2f})")
    elif max_len <= derived:
        shown_len = max_len if max_len > 0 else block_size
        messages.append(
            f"does not fit: max_model_len={shown_len} x {min_concurrency} needs "
            f"{-(-shown_len // block_size) * min_concurrency} blocks "
            f"({_gib(-(-shown_len // block_size) * min_concurrency * block_bytes)} of KV cache)"
            f" but only {num_blocks} blocks ({_gib(num_blocks * block_bytes)}) fit in "
            f"{_gib(budget)} ({_gib(total)} x {util:.2f}) after {_gib(non_kv)} of non-KV memory")
    return Plan(
        gpu_memory_bytes=total, gpu_memory_utilization=util, tensor_parallel_size=tp,
        dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=num_tokens,
        derived_max_model_len=derived, max_model_len=max_len, min_concurrency=min_concurrency,
        kv_bytes_per_token=kv_per_token, weights_bytes=weights, weights_source=source,
        non_torch_bytes=non_torch, activation_bytes=activations, cuda_graph_bytes=graphs,
        non_kv_bytes=non_kv, kv_cache_bytes=num_blocks * block_bytes, num_gpu_blocks=num_blocks,
        kv_cache_tokens=num_blocks * block_size,
        max_concurrency=num_blocks // -(-max_len // block_size) if max_len > 0 else 0,
        fits=fits, messages=tuple(messages),
    )


def _advise(failed: Plan, settings: dict, utilization, candidates: list[int],
            num_gpus: int | None) -> list[str]:
    """The nearest settings that would fit, each on its own."""
    advice = []
    tp = failed.tensor_parallel_size
    conc = failed.min_concurrency
    longest = min(failed.derived_max_model_len,
                  (failed.num_gpu_blocks // conc) * failed.block_size)
    if failed.max_model_len <= failed.derived_max_model_len and longest > 0:
        advice.append(f"lower max_model_len to {longest}")
    if utilization != "auto":
        at_max = _plan_one(tensor_parallel_size=tp, utilization="auto", **settings)
        if at_max.fits:
            advice.append(f"raise gpu_memory_utilization to {at_max.gpu_memory_utilization:.2f}")
    facts = settings["facts"]
    for larger in TENSOR_PARALLEL_CANDIDATES:
        if larger <= tp or facts.num_attention_heads % larger or (num_gpus or 8) < larger:
            continue
        if facts.num_kv_heads % larger and larger % facts.num_kv_heads:
            continue
        if _plan_one(tensor_parallel_size=larger, utilization=utilization, **settings).fits:
            advice.append(f"use tensor_parallel_size={larger}")
            break
    if settings["kv_cache_dtype"] != "fp8" and not settings["kv_cache_dtype"].startswith("fp8"):
        fp8 = _plan_one(tensor_parallel_size=tp, utilization=utilization,
                        **{**settings, "kv_cache_dtype": "fp8"})
        if fp8.fits:
            advice.append("use kv_cache_dtype=fp8")
    if not advice:
        advice.append("no single change fits: use a GPU with more memory or a smaller model")
    return advice
