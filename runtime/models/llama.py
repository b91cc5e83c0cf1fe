"""The Llama family: Llama 2/3, Mistral, Qwen2 (q/k/v biases), SmolLM.

One flat batch of tokens from many sequences goes through the model; attention reads
and writes the paged KV cache through `brim.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brim.kernels import paged_attention, store_kv
from brim.runtime.models.rope import RotaryEmbedding, rope_parameters


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (shapes per DESIGN.md)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    max_seq_len: int  # max(seq_lens), known on the host: sizes the decode kernel's split
    backend: str  # "torch" or "triton"


@dataclass(slots=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope_theta: float
    rope_scaling: dict
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    o_bias: bool
    sliding_windows: list[int | None]  # per layer

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaArgs":
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        theta, scaling = rope_parameters(cfg)
        model_type = cfg.get("model_type", "llama")
        window = cfg.get("sliding_window")
        if model_type == "qwen2":
            # Qwen2 slides only when asked to, and only in layers >= max_window_layers.
            layer_types = cfg.get("layer_types") or [
                "sliding_attention"
                if cfg.get("use_sliding_window") and i >= cfg.get("max_window_layers", num_layers)
                else "full_attention"
                for i in range(num_layers)
            ]
        else:
            layer_types = cfg.get("layer_types") or ["sliding_attention" if window else
                                                      "full_attention"] * num_layers
        windows = [window if t == "sliding_attention" and window else None for t in layer_types]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_positions=cfg.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_windows=windows,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype: transformers' order, for parity.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # q, k and v in one matmul; the loader concatenates the checkpoint's three weights.
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, positions, x, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, md.slot_mapping, backend=md.backend)
        out = paged_attention(
            q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, self.scale,
            sliding_window=self.sliding_window, max_seq_len=md.max_seq_len, backend=md.backend,
        )
        return self.o_proj(out.view(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size,
                                      bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, rotary, args.sliding_windows[layer])
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, positions, x, kv_cache, md):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, md)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (brim name, shard index) for weights fused into one matmul.
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.rotary = RotaryEmbedding(args.head_dim, args.max_positions, args.rope_theta,
                                      args.rope_scaling)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, self.rotary, i) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, md: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(positions, x, kv_cache, md)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name_map(self, name: str) -> tuple[str, int | None]:
        """Map a checkpoint tensor name to (parameter name, shard index or None)."""
        name = name.removeprefix("model.")
        for ckpt, (fused, shard) in self.stacked_params.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{fused}."), shard
        return name, None
