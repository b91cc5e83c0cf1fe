"""Model facts from a checkpoint's config.json, tokenizer_config.json and safetensors headers.

This is brim's only reader of config.json: the planner sizes from these facts and the model
code builds its modules from them, so the two can never read a key differently. Torch-free:
`brim plan` and the operator use it with nothing but the standard library.

Each shape fact has the keys that spell it, in the order they are tried:

    fact                 Llama/Mistral/Qwen2/Gemma/Phi-3   GPT-2    MPT       Falcon        ChatGLM                Whisper (decoder)
    num_layers           num_hidden_layers                 n_layer  n_layers  num_hidden_layers  num_layers       decoder_layers
    num_attention_heads  num_attention_heads               n_head   n_heads   num_attention_heads  num_attention_heads  decoder_attention_heads
    num_kv_heads         num_key_value_heads               (= heads) attn_config.kv_n_heads  multi_query / num_kv_heads  multi_query_group_num  (= heads)
    head_dim             head_dim or hidden/heads          hidden/heads         hidden/heads  kv_channels        d_model/heads
    hidden_size          hidden_size                       n_embd   d_model   hidden_size   hidden_size            d_model
    intermediate_size    intermediate_size                 n_inner or 4h  expansion_ratio x h  ffn_hidden_size or 4h  ffn_hidden_size  decoder_ffn_dim
    vocab_size           vocab_size                        vocab_size          vocab_size    padded_vocab_size      vocab_size
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from brim.runtime.planner.dtypes import (MODEL_DTYPE_BYTES, SAFETENSORS_DTYPE_BYTES,
                                         SAFETENSORS_FLOAT_DTYPES)
from brim.runtime.planner.quantization import (QuantizationSpec, checkpoint_quantization,
                                               quantized_tensor_bytes)

# Keys that bound a model's context, in the naming schemes of the families brim reads.
MAX_LEN_KEYS = (
    "max_position_embeddings",  # Llama, Mistral, Qwen2, Gemma, Phi-3, Falcon
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM
    "model_max_length",
    "max_target_positions",  # Whisper's decoder
)
# Tensor-parallel sizes brim plans for (and precomputes checkpoint weight bytes for).
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)

# Families whose MLP is two matrices (up, down) with a plain activation; every other family
# brim knows uses a gated MLP (gate, up, down: SwiGLU / GeGLU).
_UNGATED_MLP = {"gpt2", "mpt", "falcon", "RefinedWeb", "RefinedWebModel", "whisper",
                "gpt_bigcode", "gpt_neox", "opt", "bloom"}
# Families that normalise with LayerNorm (weight + bias) rather than RMSNorm (weight only).
_LAYERNORM = {"gpt2", "falcon", "RefinedWeb", "RefinedWebModel", "whisper", "gpt_bigcode",
              "gpt_neox", "opt", "bloom", "phi"}
# Families with learned absolute position embeddings: key holding the number of positions.
_LEARNED_POSITIONS = {"gpt2": "n_positions", "whisper": "max_target_positions",
                      "gpt_bigcode": "n_positions", "opt": "max_position_embeddings"}
# Families that untie the output projection unless told otherwise (transformers' default is tied).
_UNTIED_BY_DEFAULT = {"chatglm", "glm", "mistral", "qwen2", "phi3", "llama"}
# Positions brim's RoPE table covers when config.json names none.
DEFAULT_MAX_POSITIONS = 4096


@dataclass(frozen=True, slots=True)
class LengthFacts:
    """What config.json says about context length (lengths.py turns it into max_model_len).

    context_lengths: (key, value) for each of MAX_LEN_KEYS present, in that order.
    rope_scaling: the RoPE scaling in effect, None when unscaled.
    sliding_window: tokens each sliding layer attends to, None for global attention.
    """

    model_type: str
    context_lengths: tuple[tuple[str, int], ...]
    rope_scaling: dict | None
    sliding_window: int | None


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """A decoder as config.json describes it: what the memory model and the model code need.

    num_kv_heads: heads of K and V (GQA/MQA), before tensor parallelism.
    head_dim: width of one attention head.
    intermediate_size: width of the MLP's hidden layer (per matrix, for gated MLPs).
    is_gated_mlp: True for SwiGLU/GeGLU (three matrices), False for up/act/down (two).
    sliding_window: tokens sliding layers attend to, or None for global attention.
    layer_sliding_windows: per layer, its window or None (Qwen2 and Gemma mix both).
    rope_scaling: the scaling dict with its `rope_type` ("default" when unscaled).
    eos_token_ids: config.json's `eos_token_id`(s).
    checkpoint_dtype: `torch_dtype` as config.json declares it, or None.
    """

    model_type: str
    architectures: tuple[str, ...]
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    sliding_window: int | None
    is_gated_mlp: bool
    has_qkv_bias: bool
    has_o_bias: bool
    has_mlp_bias: bool
    has_linear_bias: bool
    is_layernorm: bool
    num_learned_positions: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict
    layer_sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str | None
    length: LengthFacts

    def num_parameters(self) -> int:
        """Parameters implied by the config (what the checkpoint holds, before any TP)."""
        return self.num_parameters_per_gpu(1)

    def num_parameters_per_gpu(self, tensor_parallel_size: int) -> int:
        """Parameters one GPU holds under tensor parallelism.

        Linear layers are split across GPUs (column- or row-parallel); K and V are replicated
        when there are fewer KV heads than GPUs (each GPU keeps one); norms, biases of
        row-parallel layers and learned positions are replicated; embeddings and the output
        projection are vocabulary-parallel: the vocabulary is padded to a multiple of
        VOCAB_PADDING x TP and split.
        """
        tp = tensor_parallel_size
        h, d = self.hidden_size, self.head_dim
        q_width = self.num_attention_heads * d // tp
        kv_width = self.num_kv_heads_per_gpu(tp) * d
        attention = h * (q_width + 2 * kv_width) + q_width * h
        if self.has_qkv_bias or self.has_linear_bias:
            attention += q_width + 2 * kv_width
        if self.has_linear_bias:
            attention += h  # output projection bias (replicated)
        num_mlp_matrices = 3 if self.is_gated_mlp else 2
        inter = self.intermediate_size // tp
        mlp = num_mlp_matrices * h * inter
        if self.has_linear_bias:
            mlp += (num_mlp_matrices - 1) * inter + h
        norm = h * (2 if self.is_layernorm else 1)
        layer = attention + mlp + 2 * norm
        vocab = vocab_rows_per_gpu(self.vocab_size, tp)
        embeddings = vocab * h * (1 if self.tie_word_embeddings else 2)
        positions = self.num_learned_positions * h
        return self.num_layers * layer + norm + embeddings + positions

    def num_kv_heads_per_gpu(self, tensor_parallel_size: int) -> int:
        """KV heads one GPU holds: a share, or one whole (replicated) head when the GPUs
        outnumber them."""
        return max(1, self.num_kv_heads // tensor_parallel_size)

    def kv_bytes_per_token(self, element_bytes: int, tensor_parallel_size: int = 1) -> int:
        """Bytes one token's K and V take on one GPU, over all layers:
        2 (K and V) x layers x KV heads per GPU x head_dim x element bytes."""
        return (2 * self.num_layers * self.num_kv_heads_per_gpu(tensor_parallel_size)
                * self.head_dim * element_bytes)

    def splits_evenly(self, tensor_parallel_size: int) -> bool:
        """Whether brim's tensor parallelism can split this model over that many ranks: the
        attention heads and the MLP evenly, the KV heads evenly or as whole replicated heads."""
        tp = tensor_parallel_size
        return (tp >= 1 and self.num_attention_heads % tp == 0
                and self.intermediate_size % tp == 0
                and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0))

    def check_tensor_parallel_size(self, tensor_parallel_size: int) -> None:
        """Raise ValueError naming the sizes that work when this one does not."""
        if self.splits_evenly(tensor_parallel_size):
            return
        sizes = [n for n in range(1, self.num_attention_heads + 1) if self.splits_evenly(n)]
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not split this model: it must "
            f"divide the {self.num_attention_heads} attention heads and the MLP's "
            f"{self.intermediate_size} features, and divide or be a multiple of the "
            f"{self.num_kv_heads} KV heads. Use one of {sizes}.")

    def tensor_parallel_sizes(self, candidates=TENSOR_PARALLEL_SIZES) -> list[int]:
        """The candidates that split the attention heads evenly and the KV heads evenly
        (or replicate whole KV heads when the GPUs outnumber them)."""
        return [tp for tp in candidates
                if self.num_attention_heads % tp == 0
                and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)]


# vLLM pads the vocabulary of parallel embeddings to a multiple of 64 per GPU group.
VOCAB_PADDING = 64


def vocab_rows_per_gpu(vocab_size: int, tensor_parallel_size: int) -> int:
    """Rows of the embedding one GPU holds: the whole vocabulary without TP, else a padded shard."""
    if tensor_parallel_size == 1:
        return vocab_size
    padded = -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    return -(-padded // tensor_parallel_size)


def _first(config: dict, *keys: str):
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return None


def _text_config(hf_config: dict) -> dict:
    """Multimodal wrappers keep the language model's config under `text_config`."""
    text = hf_config.get("text_config")
    if isinstance(text, dict) and text.get("hidden_size") is not None:
        return {**text, "model_type": text.get("model_type", hf_config.get("model_type", ""))}
    return hf_config


def length_facts(hf_config: dict) -> LengthFacts:
    """The length-related keys of a config.json; needs none of the shape keys."""
    config = hf_config
    text = hf_config.get("text_config")
    if isinstance(text, dict) and not any(hf_config.get(k) for k in MAX_LEN_KEYS):
        config = text  # multimodal wrappers keep the language model's lengths inside
    scaling = rope_scaling_of(config)
    return LengthFacts(
        model_type=str(config.get("model_type", "")),
        context_lengths=tuple((key, int(config[key])) for key in MAX_LEN_KEYS if config.get(key)),
        rope_scaling=None if scaling["rope_type"] == "default" else scaling,
        sliding_window=sliding_window_of(config),
    )


def rope_parameters(hf_config: dict) -> tuple[float, dict]:
    """(rope_theta, scaling with its `rope_type`) from config.json in transformers 4.x or 5.x form.

    transformers < 5 writes `rope_theta` and `rope_scaling`; 5.x writes `rope_parameters`
    (always present, rope_type "default" when unscaled), nested per layer type for
    Gemma 2/3-style models ({"full_attention": {...}, "sliding_attention": {...}}).
    """
    params = hf_config.get("rope_parameters")
    params = _full_attention(params) if isinstance(params, dict) else {}
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    return theta, rope_scaling_of(hf_config)


def rope_scaling_of(hf_config: dict) -> dict:
    """The RoPE scaling dict, with `rope_type` set ("default" when unscaled)."""
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters")
    scaling = dict(_full_attention(scaling)) if isinstance(scaling, dict) else {}
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return scaling


def _full_attention(params: dict) -> dict:
    nested = params.get("full_attention")
    return nested if isinstance(nested, dict) else params


def sliding_window_of(hf_config: dict) -> int | None:
    """The sliding window of a config, or None when the model attends globally."""
    config = _text_config(hf_config)
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return None
    if isinstance(window, list):  # some configs give one per layer
        window = min((w for w in window if w), default=None)
    return int(window) if window else None


def _layer_sliding_windows(config: dict, model_type: str, num_layers: int) -> tuple:
    window = config.get("sliding_window")
    if isinstance(window, list):
        window = min((w for w in window if w), default=None)
    if model_type == "qwen2":
        # Qwen2 slides only when asked to, and only in layers >= max_window_layers.
        layer_types = config.get("layer_types") or [
            "sliding_attention"
            if config.get("use_sliding_window") and i >= config.get("max_window_layers",
                                                                    num_layers)
            else "full_attention"
            for i in range(num_layers)
        ]
    else:
        layer_types = config.get("layer_types") or (
            ["sliding_attention" if window else "full_attention"] * num_layers)
    return tuple(int(window) if t == "sliding_attention" and window else None
                 for t in layer_types)


def model_facts(hf_config: dict) -> ModelFacts:
    """Read a config.json (as a dict) into ModelFacts; raise ValueError naming missing keys."""
    config = _text_config(hf_config)
    model_type = str(config.get("model_type", ""))
    is_whisper = model_type == "whisper"

    hidden_size = _first(config, "hidden_size", "n_embd", "d_model")
    num_layers = (_first(config, "decoder_layers") if is_whisper else
                  _first(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers"))
    num_heads = (_first(config, "decoder_attention_heads") if is_whisper else
                 _first(config, "num_attention_heads", "n_head", "n_heads"))
    missing = [name for name, value in (
        ("hidden_size (or n_embd, d_model)", hidden_size),
        ("num_hidden_layers (or n_layer, n_layers, num_layers, decoder_layers)", num_layers),
        ("num_attention_heads (or n_head, n_heads, decoder_attention_heads)", num_heads),
    ) if value is None]
    if missing:
        raise ValueError(
            f"config.json (model_type={model_type or '?'}) lacks {'; '.join(missing)}: brim "
            "cannot size this model. It reads the naming schemes of Llama, Mistral, Qwen2, "
            "Gemma, Phi-3, GPT-2, MPT, Falcon, ChatGLM and Whisper; pass a config.json with "
            "these keys."
        )
    hidden_size, num_layers, num_heads = int(hidden_size), int(num_layers), int(num_heads)

    head_dim = int(_first(config, "head_dim", "kv_channels") or hidden_size // num_heads)
    vocab_size = _first(config, "padded_vocab_size", "vocab_size")
    if vocab_size is None:
        raise ValueError(f"config.json (model_type={model_type or '?'}) lacks vocab_size "
                         "(or padded_vocab_size): brim cannot size the embeddings and logits")

    is_falcon = model_type in ("falcon", "RefinedWeb", "RefinedWebModel")
    theta, scaling = rope_parameters(config)
    return ModelFacts(
        model_type=model_type,
        architectures=tuple(hf_config.get("architectures") or ()),
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=_num_kv_heads(config, model_type, num_heads, is_falcon),
        head_dim=head_dim,
        hidden_size=hidden_size,
        intermediate_size=_intermediate_size(config, model_type, hidden_size),
        vocab_size=int(vocab_size),
        tie_word_embeddings=_is_tied(config, model_type),
        sliding_window=sliding_window_of(config),
        is_gated_mlp=model_type not in _UNGATED_MLP,
        has_qkv_bias=bool(model_type == "qwen2" or config.get("add_qkv_bias")
                          or config.get("attention_bias") or (is_falcon and config.get("bias"))),
        has_o_bias=bool(config.get("attention_bias", False)),
        has_mlp_bias=bool(config.get("mlp_bias", False)),
        has_linear_bias=model_type in ("gpt2", "gpt_bigcode", "whisper", "opt")
                        or (model_type == "mpt" and config.get("no_bias") is False),
        is_layernorm=model_type in _LAYERNORM
                     or (model_type == "mpt" and config.get("no_bias") is False),
        num_learned_positions=int(config.get(_LEARNED_POSITIONS.get(model_type, ""), 0) or 0),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings")
                                    or DEFAULT_MAX_POSITIONS),
        rope_theta=theta,
        rope_scaling=scaling,
        layer_sliding_windows=_layer_sliding_windows(config, model_type, num_layers),
        eos_token_ids=_token_ids(hf_config.get("eos_token_id")),
        checkpoint_dtype=declared_dtype(hf_config),
        length=length_facts(hf_config),
    )


def declared_dtype(hf_config: dict) -> str | None:
    """The dtype config.json declares its weights in (`torch_dtype`; `dtype` in transformers 5)."""
    value = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return str(value) if value else None


def _num_kv_heads(config: dict, model_type: str, num_heads: int, is_falcon: bool) -> int:
    if is_falcon and not config.get("new_decoder_architecture"):
        # Falcon-7B style: multi-query (one KV head) unless `multi_query` is false.
        return 1 if config.get("multi_query", True) else num_heads
    if model_type == "gpt_bigcode" and config.get("multi_query"):
        return 1
    if model_type == "mpt":
        attn_config = config.get("attn_config") or {}
        return int(attn_config.get("kv_n_heads") or num_heads)
    kv = _first(config, "num_key_value_heads", "num_kv_heads", "n_head_kv",
                "multi_query_group_num")
    if model_type == "chatglm" and config.get("multi_query_attention") is False:
        kv = None
    return int(kv or num_heads)


def _intermediate_size(config: dict, model_type: str, hidden_size: int) -> int:
    if model_type == "whisper":
        return int(config["decoder_ffn_dim"])
    if model_type == "mpt":
        return int(config.get("expansion_ratio", 4) * hidden_size)
    value = _first(config, "intermediate_size", "ffn_hidden_size", "n_inner")
    return int(value) if value else 4 * hidden_size


def _is_tied(config: dict, model_type: str) -> bool:
    if model_type == "mpt":
        return True  # MPT always projects logits with its input embedding
    tied = config.get("tie_word_embeddings")
    if tied is None:
        return model_type not in _UNTIED_BY_DEFAULT
    return bool(tied)


def _token_ids(value) -> tuple[int, ...]:
    if isinstance(value, bool):
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return ()


def tokenizer_max_length(tokenizer_config: dict | None) -> int | None:
    """tokenizer_config.json's `model_max_length`, None when absent or a no-limit sentinel."""
    if not tokenizer_config:
        return None
    value = tokenizer_config.get("model_max_length")
    # Tokenizers without a limit store a huge sentinel (int(1e30)).
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 10**12:
        return int(value)
    return None


# -- checkpoint facts: safetensors headers -----------------------------------------------------

_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    name: str
    dtype: str  # safetensors dtype: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


def parse_safetensors_header(header: bytes, source: str = "safetensors header") -> list[TensorInfo]:
    """The tensors a safetensors header (the JSON after the 8-byte length) declares."""
    entries = json.loads(header)
    return [TensorInfo(name, entry["dtype"], tuple(entry["shape"]))
            for name, entry in entries.items() if name != "__metadata__"]


def safetensors_header_length(prefix: bytes, source: str) -> int:
    """The header length the first 8 bytes (little-endian u64) of a safetensors file give."""
    if len(prefix) != 8:
        raise ValueError(f"{source} is not a safetensors file: shorter than 8 bytes")
    (length,) = struct.unpack("<Q", prefix)
    if length > _MAX_HEADER_BYTES:
        raise ValueError(f"{source}: header of {length} bytes exceeds safetensors' "
                         f"{_MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors")
    return length


def read_safetensors_header(path: str | os.PathLike) -> list[TensorInfo]:
    """The tensors a .safetensors file declares, reading only its header.

    Format: 8 bytes little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensor data.
    """
    with open(path, "rb") as f:
        length = safetensors_header_length(f.read(8), str(path))
        return parse_safetensors_header(f.read(length), str(path))


def safetensors_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files a loader reads: those the index names, else every one.

    Mistral-style repositories ship `consolidated.safetensors` (their own tensor names) beside
    the Hugging Face shards; it is skipped when other shards exist.
    """
    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in safetensors_index_files(index.read_text())]
    files = sorted(folder.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    return hf_files or files


def safetensors_index_files(index_json: str) -> list[str]:
    """The shard file names a `model.safetensors.index.json` maps tensors to, sorted."""
    return sorted(set(json.loads(index_json)["weight_map"].values()))


# Tensors split by vocabulary rows under TP (embeddings and output projections).
_VOCAB_PARALLEL = ("embed_tokens.weight", "wte.weight", "lm_head.weight",
                   "word_embeddings.weight", "output_layer.weight", "embed_out.weight",
                   "proj_out.weight")
# Key/value projections: replicated when there are fewer KV heads than GPUs.
_KV_PROJECTIONS = ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")
# Biases of column-parallel layers: split with their layer's output features (the biases of
# row-parallel layers are replicated, added once after the all-reduce).
_COLUMN_PARALLEL_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias",
                           "up_proj.bias")


def tensor_bytes_per_gpu(tensor: TensorInfo, dtype_bytes: int, tensor_parallel_size: int,
                         num_kv_heads: int, quantization: QuantizationSpec | None = None,
                         shapes: dict[str, tuple] | None = None) -> int:
    """Bytes of one checkpoint tensor on one GPU, after dtype conversion and TP sharding.

    Embeddings and output projections are vocabulary-parallel (padded shards); K/V
    projections split over at most num_kv_heads GPUs; other matrices split evenly;
    column-parallel biases (q/k/v, gate/up) split with their layer; other vectors (norms,
    row-parallel biases) and position embeddings are replicated. Under a quantization
    scheme, what brim keeps of the tensor (quantization.quantized_tensor_bytes; shapes:
    every tensor's shape by name), split evenly.
    """
    element_bytes = (dtype_bytes if tensor.dtype in SAFETENSORS_FLOAT_DTYPES
                     else SAFETENSORS_DTYPE_BYTES[tensor.dtype])
    tp = tensor_parallel_size
    name = tensor.name
    if quantization is not None:
        kept = quantized_tensor_bytes(quantization, name, tensor.shape, shapes or {})
        if kept is not None:
            return -(-kept // tp)
    is_split_vector = len(tensor.shape) == 1 and name.endswith(_COLUMN_PARALLEL_BIASES)
    if (tp == 1 or (len(tensor.shape) < 2 and not is_split_vector) or "wpe" in name
            or "embed_positions" in name):
        return tensor.num_elements * element_bytes
    if name.endswith(_VOCAB_PARALLEL):
        rows = vocab_rows_per_gpu(tensor.shape[0], tp)
        return rows * math.prod(tensor.shape[1:]) * element_bytes
    split = min(tp, num_kv_heads) if name.endswith(_KV_PROJECTIONS) else tp
    return -(-tensor.num_elements // split) * element_bytes


def weights_bytes_table(tensors: list[TensorInfo], num_kv_heads: int,
                        quantization: QuantizationSpec | None = None) -> dict[str, int]:
    """Exact checkpoint weight bytes per GPU for every serving-dtype size and planned TP size,
    keyed "<dtype bytes>x<tp>" (e.g. "2x4": bf16 weights on each of 4 GPUs); for a plain
    checkpoint also "fp8:<dtype bytes>x<tp>", its weights quantized to FP8 while loading.

    A table rather than the tensor list so that the facts stay a few hundred bytes: small
    enough for a pod's termination message (4 KiB), which is how a `pvc://` model's facts
    reach the operator.
    """
    return {f"{prefix}{dtype_bytes}x{tp}": weights_bytes_of(tensors, dtype_bytes, tp,
                                                            num_kv_heads, spec)
            for prefix, spec in _quantization_variants(quantization)
            for dtype_bytes in sorted(set(MODEL_DTYPE_BYTES.values()))
            for tp in TENSOR_PARALLEL_SIZES}


def _quantization_variants(declared: QuantizationSpec | None):
    """Table rows: the checkpoint as declared, and quantized to FP8 on load when plain."""
    yield "", declared
    if declared is None:
        yield "fp8:", QuantizationSpec(method="fp8", bits=8, on_load=True)


def weights_bytes_of(tensors, dtype_bytes: int, tensor_parallel_size: int, num_kv_heads: int,
                     quantization: QuantizationSpec | None = None) -> int:
    """Weight bytes per GPU of these tensors as brim holds them."""
    shapes = {t.name: t.shape for t in tensors} if quantization is not None else None
    return sum(tensor_bytes_per_gpu(t, dtype_bytes, tensor_parallel_size, num_kv_heads,
                                    quantization, shapes) for t in tensors)


# -- a checkpoint's facts, all together ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckpointFacts:
    """Everything brim plans from, without reading a weight.

    config: config.json as read.
    tokenizer_config: tokenizer_config.json, or None.
    generation_config: generation_config.json, or None (its eos_token_id adds to config.json's).
    weights_bytes: weights_bytes_table() of the safetensors headers; None when no headers were
        read (the planner then estimates weights from the config's parameter count).
    tensors: the headers' tensors when read on this machine (exact bytes for any TP size);
        not part of the JSON form.
    path: the checkpoint folder when it is on this machine.
    """

    config: dict
    tokenizer_config: dict | None = None
    generation_config: dict | None = None
    weights_bytes: dict[str, int] | None = None
    tensors: tuple[TensorInfo, ...] | None = field(default=None, compare=False, repr=False)
    path: Path | None = field(default=None, compare=False)

    @property
    def model(self) -> ModelFacts:
        """The shape facts (read on each access: a config without shape keys is still a
        valid source of lengths, and raises only when the shape is asked for)."""
        return model_facts(self.config)

    @property
    def tokenizer_max_length(self) -> int | None:
        return tokenizer_max_length(self.tokenizer_config)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids from config.json and generation_config.json (the tokenizer may add its own)."""
        ids = set(self.model.eos_token_ids)
        if self.generation_config:
            ids.update(_token_ids(self.generation_config.get("eos_token_id")))
        return frozenset(ids)

    def checkpoint_weights_bytes(self, dtype_bytes: int, tensor_parallel_size: int,
                                 quantization: QuantizationSpec | None = None) -> int | None:
        """Exact weight bytes per GPU from the headers, or None when they were not read.

        quantization: the scheme served (resolve_quantization); None for plain weights.
        """
        if self.tensors is not None:
            return weights_bytes_of(self.tensors, dtype_bytes, tensor_parallel_size,
                                    self.model.num_kv_heads, quantization)
        if self.weights_bytes is None:
            return None
        prefix = "fp8:" if quantization is not None and quantization.on_load else ""
        return self.weights_bytes.get(f"{prefix}{dtype_bytes}x{tensor_parallel_size}")

    def to_json(self) -> dict:
        """A JSON-able form (without tensors and path) that from_json() reads back."""
        weights = self.weights_bytes
        if self.tensors is not None:
            weights = weights_bytes_table(list(self.tensors), self.model.num_kv_heads,
                                          checkpoint_quantization(self.config))
        # Only what the facts read from the tokenizer and generation configs: a chat template
        # alone can be kilobytes.
        tokenizer = {k: v for k, v in (self.tokenizer_config or {}).items()
                     if k == "model_max_length"} or None
        generation = {k: v for k, v in (self.generation_config or {}).items()
                      if k == "eos_token_id"} or None
        return {"config": self.config, "tokenizer_config": tokenizer,
                "generation_config": generation, "weights_bytes": weights}

    @classmethod
    def from_json(cls, data: dict) -> "CheckpointFacts":
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError("model facts must be an object with a `config` object "
                             "(config.json)")
        return cls(config=data["config"], tokenizer_config=data.get("tokenizer_config"),
                   generation_config=data.get("generation_config"),
                   weights_bytes=data.get("weights_bytes"))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_checkpoint(path: str | os.PathLike) -> CheckpointFacts:
    """The facts of a checkpoint folder (config.json required; tokenizer and generation
    configs and safetensors headers when present), or of a lone config.json file."""
    path = Path(path)
    if path.is_file():
        return CheckpointFacts(config=json.loads(path.read_text()))
    config = _read_json(path / "config.json")
    if config is None:
        raise FileNotFoundError(
            f"{path} has no config.json; pass a folder holding a Hugging Face checkpoint "
            "(config.json, *.safetensors, tokenizer files)")
    files = safetensors_files(path)
    tensors = tuple(t for f in files for t in read_safetensors_header(f)) if files else None
    return CheckpointFacts(config=config,
                           tokenizer_config=_read_json(path / "tokenizer_config.json"),
                           generation_config=_read_json(path / "generation_config.json"),
                           tensors=tensors, path=path)


# A Kubernetes termination message holds 4096 bytes; larger facts travel compressed.
TERMINATION_MESSAGE_BYTES = 4096
_COMPRESSED = "gzip+base64:"


def encode_facts(facts: CheckpointFacts) -> str:
    """The facts as one line for a pod's termination message: compact JSON, or gzip+base64
    of it (prefixed) when the JSON would not fit."""
    import base64
    import gzip

    text = json.dumps(facts.to_json(), separators=(",", ":"), sort_keys=True)
    if len(text.encode()) <= TERMINATION_MESSAGE_BYTES:
        return text
    packed = _COMPRESSED + base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()
    if len(packed) > TERMINATION_MESSAGE_BYTES:
        raise ValueError(f"the model's facts take {len(packed)} bytes compressed, more than a "
                         f"termination message's {TERMINATION_MESSAGE_BYTES}: give the model's "
                         "config inline (spec.model.config) instead")
    return packed


def decode_facts(message: str) -> CheckpointFacts:
    """encode_facts() read back; ValueError when the message is not facts."""
    import base64
    import binascii
    import gzip

    message = message.strip()
    try:
        if message.startswith(_COMPRESSED):
            message = gzip.decompress(base64.b64decode(message[len(_COMPRESSED):])).decode()
        data = json.loads(message)
    except (ValueError, binascii.Error, OSError) as exc:
        raise ValueError(f"not a model-facts message: {exc}") from None
    return CheckpointFacts.from_json(data)
