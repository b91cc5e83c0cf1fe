"""Tensor parallelism as a transformation of the plain model, and loading each rank's slice.

`shard_model` rewrites a `LlamaForCausalLM` built on the meta device so that it holds one
rank's share of every layer (Megatron's split):

    qkv_proj, gate_up_proj   column-parallel: this rank's heads / MLP features, no communication
    o_proj, down_proj        row-parallel: this rank's input features, then an all-reduce
    embed_tokens             vocabulary-parallel: this rank's rows, zeros elsewhere, all-reduce
    lm_head                  vocabulary-parallel: this rank's logits, gathered on rank 0

KV heads are split like the query heads; with more ranks than KV heads each rank keeps the one
KV head its query heads read (replicated over tensor_parallel_size / num_kv_heads ranks). The
vocabulary is padded to VOCAB_PADDING x tensor_parallel_size rows, as the planner counts it
(planner.facts.vocab_rows_per_gpu). The model code itself has no parallel branches: it reads
its widths from the attributes rewritten here.

`load_sharded_model` reads from the safetensors files only the bytes of this rank's slices
(safetensors' `get_slice` on the mmapped file) and counts them (`LoadStats`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from brim.runtime.planner.facts import ModelFacts, safetensors_files, vocab_rows_per_gpu


class TensorParallelGroup:
    """This process's place in a tensor-parallel group and the collectives the model needs.

    Holds its own process group object (no torch.distributed default group), so that one
    process may hold several engines over its life, and a TP=1 engine none.
    """

    def __init__(self, rank: int, world_size: int, process_group) -> None:
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group

    @classmethod
    def connect(cls, rank: int, world_size: int, port: int, backend: str,
                timeout_s: float) -> "TensorParallelGroup":
        """Join the group whose rank 0 serves the rendezvous store on 127.0.0.1:port."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timeout)
        if backend == "nccl":
            group = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        return cls(rank, world_size, group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        self.process_group.allreduce([x]).wait()
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's value."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.process_group.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        self.process_group.broadcast(x, 0).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x concatenated along the last dim on rank 0; None on the others."""
        import torch.distributed as dist

        opts = dist.GatherOptions()
        opts.rootRank = 0
        x = x.contiguous()
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            self.process_group.gather([parts], [x], opts).wait()
            return torch.cat(parts, dim=-1)
        self.process_group.gather([], [x], opts).wait()
        return None

    @property
    def _device(self) -> torch.device:
        return (torch.device("cuda", torch.cuda.current_device())
                if type(self.process_group).__name__ == "ProcessGroupNCCL"
                else torch.device("cpu"))


# -- the parallel layers ------------------------------------------------------------------


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: input features split over the ranks.

    The matmul is a child `nn.Linear` (so the CPU's oneDNN packing applies to it); the bias
    is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 group: TensorParallelGroup) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.linear(x))  # [tokens, out_features]
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + num_rows) of the (padded) vocabulary; other ids look up zeros,
    and the all-reduce sums the one rank that holds each id."""

    def __init__(self, num_rows: int, hidden_size: int, start: int,
                 group: TensorParallelGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, hidden_size))
        self.start, self.num_rows, self.group = start, num_rows, group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start  # [tokens]
        is_elsewhere = (local < 0) | (local >= self.num_rows)
        x = F.embedding(local.masked_fill(is_elsewhere, 0), self.weight)  # [tokens, hidden]
        x.masked_fill_(is_elsewhere[:, None], 0)
        return self.group.all_reduce(x)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary rows of the output projection; the logits gathered on rank 0
    (the only rank that samples), cut back to the true vocabulary. None on other ranks."""

    def __init__(self, hidden_size: int, num_rows: int, vocab_size: int,
                 group: TensorParallelGroup) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_rows, bias=False)
        self.vocab_size, self.group = vocab_size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.group.gather_last_dim(self.linear(hidden))  # [rows, padded vocab]
        return None if logits is None else logits[:, :self.vocab_size]


# -- the transformation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shard:
    """The part of a checkpoint tensor one rank holds.

    dim: the dim that is split (0: output features / vocabulary rows, 1: input features).
    start, size: the checkpoint's indices [start, start + size) along dim.
    offset: where they go along dim in brim's parameter (q, k and v share one fused weight).
    """

    dim: int
    start: int
    size: int
    offset: int = 0


class ShardLayout:
    """Where each checkpoint tensor's slice goes on one rank (rank of world_size)."""

    def __init__(self, facts: ModelFacts, rank: int, world_size: int) -> None:
        tp = world_size
        self.facts, self.rank, self.world_size = facts, rank, tp
        d = facts.head_dim
        self.num_heads = facts.num_attention_heads // tp
        self.num_kv_heads = facts.num_kv_heads_per_gpu(tp)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        # With more ranks than KV heads, rank r keeps KV head r // (tp / num_kv_heads).
        replicas = max(1, tp // facts.num_kv_heads)
        self.kv_start = (rank // replicas) * self.kv_size
        self.intermediate_size = facts.intermediate_size // tp
        self.vocab_rows = vocab_rows_per_gpu(facts.vocab_size, tp)
        self.vocab_start = rank * self.vocab_rows

    def shard(self, name: str, index: int | None) -> Shard | None:
        """The slice of brim parameter `name` (index: q/k/v or gate/up within a fused one)
        this rank holds; None when it holds all of it."""
        r = self.rank
        if ".qkv_proj." in name:
            if index == 0:
                return Shard(0, r * self.q_size, self.q_size)
            return Shard(0, self.kv_start, self.kv_size,
                         self.q_size + (index - 1) * self.kv_size)
        if ".gate_up_proj." in name:
            size = self.intermediate_size
            return Shard(0, r * size, size, index * size)
        if name.endswith(".o_proj.weight"):
            return Shard(1, r * self.q_size, self.q_size)
        if name.endswith(".down_proj.weight"):
            return Shard(1, r * self.intermediate_size, self.intermediate_size)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            size = max(0, min(self.vocab_rows, self.facts.vocab_size - self.vocab_start))
            return Shard(0, self.vocab_start, size)
        return None


# brim's names for the parameters the parallel layers wrap (a row-parallel matmul is a child).
_WRAPPED = {".o_proj.weight": ".o_proj.linear.weight",
            ".down_proj.weight": ".down_proj.linear.weight"}


def parameter_name(name: str) -> str:
    """The sharded model's parameter for brim parameter `name` of the plain model."""
    if name == "lm_head.weight":
        return "lm_head.linear.weight"
    for plain, wrapped in _WRAPPED.items():
        if name.endswith(plain):
            return name.removesuffix(plain) + wrapped
    return name


def shard_model(model: nn.Module, group: TensorParallelGroup) -> nn.Module:
    """Rewrite a meta-device LlamaForCausalLM in place into rank `group.rank`'s share."""
    facts = model.facts
    layout = ShardLayout(facts, group.rank, group.world_size)
    h = facts.hidden_size
    for layer in model.layers:
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = layout.num_heads, layout.num_kv_heads
        attn.q_size, attn.kv_size = layout.q_size, layout.kv_size
        attn.qkv_proj = nn.Linear(h, layout.q_size + 2 * layout.kv_size,
                                  bias=facts.has_qkv_bias)
        attn.o_proj = RowParallelLinear(layout.q_size, h, facts.has_o_bias, group)
        mlp = layer.mlp
        mlp.intermediate_size = layout.intermediate_size
        mlp.gate_up_proj = nn.Linear(h, 2 * layout.intermediate_size, bias=facts.has_mlp_bias)
        mlp.down_proj = RowParallelLinear(layout.intermediate_size, h, facts.has_mlp_bias,
                                          group)
    model.embed_tokens = VocabParallelEmbedding(layout.vocab_rows, h, layout.vocab_start, group)
    model.lm_head = ParallelLMHead(h, layout.vocab_rows, facts.vocab_size, group)
    return model


# -- loading this rank's slices -----------------------------------------------------------


@dataclass(slots=True)
class LoadStats:
    """What loading one rank read: bytes of checkpoint tensor data (in the file's dtype)."""

    num_bytes_read: int = 0


def load_sharded_model(cls, path, facts: ModelFacts, torch_dtype: torch.dtype, device: str,
                       group: TensorParallelGroup):
    """Rank `group.rank`'s share of the checkpoint at path, loaded slice by slice.

    Returns the model (not yet packed for the CPU) with `load_stats` (LoadStats) set.
    """
    with torch.device("meta"):
        model = shard_model(cls(facts), group)
    layout = ShardLayout(facts, group.rank, group.world_size)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    stats = LoadStats()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                name, index = model.checkpoint_name_map(ckpt_name)
                target = parameter_name(name)
                if target not in params:
                    if "rotary_emb" in name:
                        continue  # some checkpoints store the derived inv_freq buffer
                    raise ValueError(f"{file.name}: unexpected tensor {ckpt_name!r}")
                piece = _read(f.get_slice(ckpt_name), layout.shard(name, index))
                stats.num_bytes_read += piece.numel() * piece.element_size()
                shard = layout.shard(name, index)
                if shard is None:
                    state[target] = piece.to(torch_dtype)
                    continue
                # Zeros where no checkpoint row lands: the vocabulary's padding.
                dest = state.get(target)
                if dest is None:
                    dest = state[target] = torch.zeros(params[target].shape, dtype=torch_dtype)
                dest.narrow(shard.dim, shard.offset, piece.shape[shard.dim]).copy_(piece)
    if "lm_head.linear.weight" not in state and facts.tie_word_embeddings:
        state["lm_head.linear.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors for {missing[:5]}")
    state = {name: t.to(device) for name, t in state.items()}
    if facts.tie_word_embeddings:
        state["lm_head.linear.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.load_stats = stats
    return model


def _read(tensor_slice, shard: Shard | None) -> torch.Tensor:
    """Only the shard's bytes of one tensor in an open safetensors file."""
    if shard is None:
        return tensor_slice[:]
    if shard.size == 0:  # a rank past the vocabulary's end holds only padding
        shape = list(tensor_slice.get_shape())
        shape[shard.dim] = 0
        return torch.empty(shape)
    end = shard.start + shard.size
    if shard.dim == 0:
        return tensor_slice[shard.start:end]
    return tensor_slice[:, shard.start:end]
