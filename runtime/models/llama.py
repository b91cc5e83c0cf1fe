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
from brim.runtime.models.rope import RotaryEmbedding
from brim.runtime.planner.facts import ModelFacts


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (layout: docs/engine.md)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    max_seq_len: int  # max(seq_lens), known on the host: sizes the decode kernel's split
    backend: str  # "torch" or "triton"
    cpu_plan: object = None  # torch backend: kernels.cpu_attention.CpuAttentionPlan


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
    def __init__(self, facts: ModelFacts, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads = facts.num_attention_heads
        self.num_kv_heads = facts.num_kv_heads
        self.head_dim = facts.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul; the loader concatenates the checkpoint's three weights.
        self.qkv_proj = nn.Linear(facts.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=facts.has_qkv_bias)
        self.o_proj = nn.Linear(self.q_size, facts.hidden_size, bias=facts.has_o_bias)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window
        # An FP8 KV cache stores k / k_scale and v / v_scale (per layer, from the checkpoint
        # when it has them; quantization.WeightTransform sets them). Unused at 16/32 bits.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, positions, x, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(positions, x)
        return self.o_proj(self.attend(q, k, v, kv_cache, md))

    def project(self, positions, x):
        """x [T, hidden] -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim], RoPE'd."""
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q's and k's heads lie side by side: rotated in one pass, then split (views).
        qk = self.rotary.rotate(positions, qk.view(num_tokens, -1, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(num_tokens, self.num_kv_heads, self.head_dim)

    def attend(self, q, k, v, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        """Store k, v in the paged cache and attend: [T, heads * head_dim]. Never compiled
        (models/compiled.py): the step's plan and the cache writes stay plain Python."""
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, md.slot_mapping, backend=md.backend,
                 finite=md.cpu_plan is not None, k_scale=self.k_scale, v_scale=self.v_scale)
        out = paged_attention(
            q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, self.scale,
            sliding_window=self.sliding_window, max_seq_len=md.max_seq_len, backend=md.backend,
            cpu_plan=md.cpu_plan, k_scale=self.k_scale, v_scale=self.v_scale,
        )
        return out.view(q.shape[0], self.q_size)


class MLP(nn.Module):
    def __init__(self, facts: ModelFacts) -> None:
        super().__init__()
        self.intermediate_size = facts.intermediate_size
        self.gate_up_proj = nn.Linear(facts.hidden_size, 2 * facts.intermediate_size,
                                      bias=facts.has_mlp_bias)
        self.down_proj = nn.Linear(facts.intermediate_size, facts.hidden_size,
                                   bias=facts.has_mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, facts: ModelFacts, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(facts, rotary, facts.layer_sliding_windows[layer])
        self.mlp = MLP(facts)
        self.input_layernorm = RMSNorm(facts.hidden_size, facts.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(facts.hidden_size, facts.rms_norm_eps)

    def forward(self, positions, x, kv_cache, md):
        q, k, v = self.attention_inputs(positions, x)
        return self.attention_outputs(x, self.self_attn.attend(q, k, v, kv_cache, md))

    # The layer in three parts, so that the two around attention can be compiled
    # (models/compiled.py) while attention itself stays eager.
    def attention_inputs(self, positions, x):
        """The input norm, the q/k/v projection and RoPE: q, k, v of `Attention.project`."""
        return self.self_attn.project(positions, self.input_layernorm(x))

    def attention_outputs(self, x, attn):
        """x [T, hidden], attn [T, heads * head_dim] -> the layer's output [T, hidden]."""
        x = x + self.self_attn.o_proj(attn)
        return x + self.mlp(self.post_attention_layernorm(x))


# The work between attention calls, in the three shapes a forward pass needs it: what
# models/compiled.py compiles, a graph each (attention itself stays eager).
def first_attention_inputs(layer: DecoderLayer, positions, x):
    """Before the first attention: layer 0's q, k, v."""
    return layer.attention_inputs(positions, x)


def between_attentions(layer: DecoderLayer, next_layer: DecoderLayer, positions, x, attn):
    """From one layer's attention output to the next layer's attention inputs: the
    layer's output x, and next_layer's q, k, v."""
    x = layer.attention_outputs(x, attn)
    q, k, v = next_layer.attention_inputs(positions, x)
    return x, q, k, v


def after_last_attention(layer: DecoderLayer, norm: RMSNorm, x, attn):
    """The last layer's output through the final norm: the model's hidden states."""
    return norm(layer.attention_outputs(x, attn))


# The same three for steps of a few tokens on CPU, where they run eagerly (models/compiled.py,
# MIN_COMPILED_TOKENS): the norms with their residual adds, SiLU * up and RoPE as single C++
# ops (kernels/cpu_layer_ops.cpp, `ops` = torch.ops.brim_cpu), 12 dispatches per layer
# besides the matmuls and attention instead of ~45. x, the residual stream, is updated in
# place: the forward's own tensor (the embedding's output), read by nothing else.
def first_attention_inputs_few(ops, layer: DecoderLayer, positions, x):
    norm = layer.input_layernorm
    return _project_normed(ops, layer.self_attn, positions, ops.rms_norm(x, norm.weight, norm.eps))


def between_attentions_few(ops, layer: DecoderLayer, next_layer: DecoderLayer, positions, x,
                           attn):
    h = _mlp_few(ops, layer, x, attn)
    norm = next_layer.input_layernorm
    h = ops.add_rms_norm_(x, h, norm.weight, norm.eps)
    q, k, v = _project_normed(ops, next_layer.self_attn, positions, h)
    return x, q, k, v


def after_last_attention_few(ops, layer: DecoderLayer, norm: RMSNorm, x, attn):
    return ops.add_rms_norm_(x, _mlp_few(ops, layer, x, attn), norm.weight, norm.eps)


def _mlp_few(ops, layer: DecoderLayer, x, attn):
    """x += o_proj(attn) (in place); the MLP's output on the post-attention norm of x (the
    caller adds it)."""
    norm = layer.post_attention_layernorm
    h = ops.add_rms_norm_(x, layer.self_attn.o_proj(attn), norm.weight, norm.eps)
    return layer.mlp.down_proj(ops.silu_mul(layer.mlp.gate_up_proj(h)))


def _project_normed(ops, attn: Attention, positions, h):
    """Attention.project on an already normed h, RoPE in place on the q/k/v output."""
    num_tokens = h.shape[0]
    qkv = attn.qkv_proj(h)
    qk = qkv[:, :attn.q_size + attn.kv_size].view(num_tokens, -1, attn.head_dim)
    ops.rope_(qk, positions, attn.rotary.cos_sin)
    q, k = qk.split([attn.num_heads, attn.num_kv_heads], dim=1)
    return q, k, qkv[:, attn.q_size + attn.kv_size:].view(num_tokens, attn.num_kv_heads,
                                                          attn.head_dim)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (brim name, shard index) for weights fused into one matmul.
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, facts: ModelFacts) -> None:
        super().__init__()
        self.facts = facts
        self.compiled_regions = None  # set by models/compiled.py's compile_model
        self.rotary = RotaryEmbedding(facts.head_dim, facts.max_position_embeddings,
                                      facts.rope_theta, facts.rope_scaling)
        self.embed_tokens = nn.Embedding(facts.vocab_size, facts.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(facts, self.rotary, i) for i in range(facts.num_layers)
        )
        self.norm = RMSNorm(facts.hidden_size, facts.rms_norm_eps)
        self.lm_head = nn.Linear(facts.hidden_size, facts.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, md: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        regions = self.compiled_regions
        if regions is None:
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(positions, x, kv_cache, md)
            return self.norm(x)
        # Compiled (models/compiled.py): one call between two attentions, not two.
        layers = self.layers
        q, k, v = regions.first(layers[0], positions, x)
        for i in range(len(layers) - 1):
            attn = layers[i].self_attn.attend(q, k, v, kv_caches[i], md)
            x, q, k, v = regions.between(layers[i], layers[i + 1], positions, x, attn)
        attn = layers[-1].self_attn.attend(q, k, v, kv_caches[-1], md)
        return regions.last(layers[-1], self.norm, x, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name_map(self, name: str) -> tuple[str, int | None]:
        """Map a checkpoint tensor name to (parameter name, shard index or None)."""
        name = name.removeprefix("model.")
        for ckpt, (fused, shard) in self.stacked_params.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{fused}."), shard
        return name, None
