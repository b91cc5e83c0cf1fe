"""Model facts from config.json, across the naming schemes of the families brim sizes.

Torch-free: `brim plan` and the operator read a config.json with nothing but the standard library.

Each fact has the keys that spell it, in the order they are tried:

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
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """The shape of a decoder, as the memory model needs it.

    num_kv_heads: heads of K and V (GQA/MQA), before tensor parallelism.
    head_dim: width of one attention head.
    intermediate_size: width of the MLP's hidden layer (per matrix, for gated MLPs).
    is_gated_mlp: True for SwiGLU/GeGLU (three matrices), False for up/act/down (two).
    sliding_window: tokens each layer attends to, or None for global attention.
    """

    model_type: str
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
    has_linear_bias: bool
    is_layernorm: bool
    num_learned_positions: int

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
        kv_width = max(1, self.num_kv_heads // tp) * d
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
    return ModelFacts(
        model_type=model_type,
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
        has_linear_bias=model_type in ("gpt2", "gpt_bigcode", "whisper", "opt")
                        or (model_type == "mpt" and config.get("no_bias") is False),
        is_layernorm=model_type in _LAYERNORM
                     or (model_type == "mpt" and config.get("no_bias") is False),
        num_learned_positions=int(config.get(_LEARNED_POSITIONS.get(model_type, ""), 0) or 0),
    )


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


def sliding_window_of(hf_config: dict) -> int | None:
    """The sliding window of a config, or None when the model attends globally."""
    config = _text_config(hf_config)
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return None
    if isinstance(window, list):  # some configs give one per layer
        window = min((w for w in window if w), default=None)
    return int(window) if window else None


# -- checkpoint facts: safetensors headers -----------------------------------------------------

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Floating tensors are converted to the serving dtype on load; others are kept as stored.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
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


def read_safetensors_header(path: str | os.PathLike) -> list[TensorInfo]:
    """The tensors a .safetensors file declares, reading only its header.

    Format: 8 bytes little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensor data.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file: shorter than 8 bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header of {length} bytes exceeds safetensors' "
                             f"{_MAX_HEADER_BYTES}-byte limit; the file is corrupt or not safetensors")
        header = json.loads(f.read(length))
    return [TensorInfo(name, entry["dtype"], tuple(entry["shape"]))
            for name, entry in header.items() if name != "__metadata__"]


def safetensors_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files a loader reads: those the index names, else every one.

    Mistral-style repositories ship `consolidated.safetensors` beside the Hugging Face shards;
    it is skipped when other shards exist.
    """
    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    return hf_files or files


# Tensors split by vocabulary rows under TP (embeddings and output projections).
_VOCAB_PARALLEL = ("embed_tokens.weight", "wte.weight", "lm_head.weight",
                   "word_embeddings.weight", "output_layer.weight", "embed_out.weight",
                   "proj_out.weight")
# Key/value projections: replicated when there are fewer KV heads than GPUs.
_KV_PROJECTIONS = ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")


def tensor_bytes_per_gpu(tensor: TensorInfo, dtype_bytes: int, tensor_parallel_size: int,
                         num_kv_heads: int) -> int:
    """Bytes of one checkpoint tensor on one GPU, after dtype conversion and TP sharding.

    Embeddings and output projections are vocabulary-parallel (padded shards); K/V
    projections split over at most num_kv_heads GPUs; other matrices split evenly;
    vectors (norms, biases) and position embeddings are replicated.
    """
    element_bytes = (dtype_bytes if tensor.dtype in FLOAT_DTYPES
                     else SAFETENSORS_DTYPE_BYTES[tensor.dtype])
    tp = tensor_parallel_size
    name = tensor.name
    if tp == 1 or len(tensor.shape) < 2 or "wpe" in name or "embed_positions" in name:
        return tensor.num_elements * element_bytes
    if name.endswith(_VOCAB_PARALLEL):
        rows = vocab_rows_per_gpu(tensor.shape[0], tp)
        return rows * math.prod(tensor.shape[1:]) * element_bytes
    split = min(tp, num_kv_heads) if name.endswith(_KV_PROJECTIONS) else tp
    return -(-tensor.num_elements // split) * element_bytes
