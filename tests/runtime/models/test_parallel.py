"""Tensor parallelism's split (models/parallel.py) on tiny random-weight checkpoints, with gloo
on CPU: greedy tokens equal transformers' at TP=2 (Llama, 2 KV heads) and TP=4 (Qwen2 with
q/k/v biases and tied embeddings, 2 KV heads: each replicated on two ranks), each
rank holds exactly the planner's per-GPU weight bytes, and reads from disk only the bytes of
its slices (counted against the safetensors headers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from brim.runtime import LLM, SamplingParams
from brim.runtime.models.parallel import ShardLayout
from brim.runtime.planner.dtypes import SAFETENSORS_DTYPE_BYTES
from brim.runtime.planner.facts import model_facts, read_checkpoint
from brim.runtime.planner.memory import GiB, PlanRequest, plan, rope_table_bytes
from tests.runtime.conftest import hf_greedy
from tests.runtime.models.test_llama import _tiny_checkpoint

VOCAB = 49152  # _tiny_checkpoint's; 8 heads of 8, 2 KV heads, MLP 160, 3 layers


# Llama at TP=2 (1 KV head per rank), Qwen2 at TP=4 (2 KV heads, each on two ranks). Each
# start spawns TP-1 processes: kept to these two on the 2-core CI machines.
@pytest.fixture(scope="module", params=[("llama", 2), ("qwen2", 4)],
                ids=["llama-tp2", "qwen2-tp4"])
def tp(request, tmp_path_factory):
    """(family, TP) -> an LLM over that many ranks, with its checkpoint and HF model."""
    family, size = request.param
    path, hf_model = _tiny_checkpoint(tmp_path_factory.mktemp(family), family)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=32,
              max_num_seqs=4, num_gpu_blocks=64, tensor_parallel_size=size)
    yield SimpleNamespace(llm=llm, path=path, hf_model=hf_model, size=size)
    llm.shutdown()


def test_greedy_tokens_equal_transformers(tp):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist()
               for n in (5, 17, 40, 90)]
    want = [hf_greedy(tp.hf_model, p, 24) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # 32 tokens a step: prefills are chunked and steps mix prefill and decode.
    got = [o.outputs[0].token_ids for o in tp.llm.generate(prompts, params)]
    assert got == want


def test_each_rank_holds_the_planners_per_gpu_weights_and_kv_bytes(tp):
    checkpoint = read_checkpoint(tp.path)
    predicted = plan(PlanRequest(checkpoint=checkpoint, gpu_memory_bytes=8 * GiB,
                                 device="cpu", dtype="float32", max_model_len=512,
                                 tensor_parallel_size=tp.size))
    # The plan counts the RoPE table beside the weights (the CUDA measurement includes it).
    per_rank = predicted.weights_bytes - rope_table_bytes(checkpoint.model)
    reports = tp.llm.engine.workers.reports
    assert [r.rank for r in reports] == list(range(tp.size))
    assert [r.weights_bytes for r in reports] == [per_rank] * tp.size
    whole = plan(PlanRequest(checkpoint=checkpoint, gpu_memory_bytes=8 * GiB, device="cpu",
                             dtype="float32", max_model_len=512))
    assert per_rank < whole.weights_bytes / (tp.size / 2)
    # The KV cache each rank allocated: the agreed 64 blocks of 16 tokens at the planner's
    # per-GPU bytes per token (1 of the 2 KV heads on every rank, at TP=2 and at TP=4).
    assert predicted.kv_bytes_per_token == 2 * 3 * 1 * 8 * 4
    assert tp.llm.engine.memory_report.kv_bytes_per_token == predicted.kv_bytes_per_token
    assert [r.kv_cache_bytes for r in reports] == [64 * 16 * predicted.kv_bytes_per_token] * tp.size


def _slice_bytes(name: str, shape: tuple, element_bytes: int, rank: int, size: int) -> int:
    """What rank `rank` of `size` must read of one checkpoint tensor, from its shape alone."""
    num_elements = element_bytes
    for n in shape:
        num_elements *= n
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        rows_per_rank = -(-(-(-shape[0] // 64) * 64) // size)  # vocabulary padded to 64 x TP
        rows = max(0, min(rows_per_rank, shape[0] - rank * rows_per_rank))
        return rows * shape[1] * element_bytes
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        return num_elements // min(size, 2)  # 2 KV heads: whole heads, replicated past 2 ranks
    if name.endswith(("q_proj.weight", "q_proj.bias", "o_proj.weight", "gate_proj.weight",
                      "up_proj.weight", "down_proj.weight")):
        return num_elements // size
    return num_elements  # norms


def test_each_rank_reads_only_its_slices_from_disk(tp):
    checkpoint = read_checkpoint(tp.path)
    whole = sum(t.num_elements * SAFETENSORS_DTYPE_BYTES[t.dtype] for t in checkpoint.tensors)
    for report in tp.llm.engine.workers.reports:
        want = sum(_slice_bytes(t.name, t.shape, SAFETENSORS_DTYPE_BYTES[t.dtype], report.rank,
                                tp.size) for t in checkpoint.tensors)
        assert report.num_bytes_read == want
        assert report.num_bytes_read < whole * 0.6


def test_the_layout_replicates_kv_heads_when_ranks_outnumber_them():
    # 8 query heads of 64 over 2 KV heads (GQA groups of 4) on 4 ranks: ranks 0 and 1 read
    # KV head 0 (their query heads 0-3), ranks 2 and 3 KV head 1 (query heads 4-7).
    facts = model_facts({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                         "hidden_size": 512, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "intermediate_size": 1024,
                         "num_hidden_layers": 1, "vocab_size": 1000})
    layouts = [ShardLayout(facts, rank, 4) for rank in range(4)]
    q = [layout.shard("layers.0.self_attn.qkv_proj.weight", 0) for layout in layouts]
    k = [layout.shard("layers.0.self_attn.qkv_proj.weight", 1) for layout in layouts]
    v = [layout.shard("layers.0.self_attn.qkv_proj.weight", 2) for layout in layouts]
    assert [(s.start, s.size, s.offset) for s in q] == [(0, 128, 0), (128, 128, 0),
                                                        (256, 128, 0), (384, 128, 0)]
    assert [(s.start, s.size, s.offset) for s in k] == [(0, 64, 128), (0, 64, 128),
                                                        (64, 64, 128), (64, 64, 128)]
    assert [s.offset for s in v] == [192] * 4
    # 1000 tokens padded to 1024 and split: 256 rows each, the last rank 232 real ones.
    vocab = [layout.shard("embed_tokens.weight", None) for layout in layouts]
    assert [(s.start, s.size) for s in vocab] == [(0, 256), (256, 256), (512, 256), (768, 232)]
    down = layouts[3].shard("layers.0.mlp.down_proj.weight", None)
    assert (down.dim, down.start, down.size) == (1, 768, 256)
    assert layouts[1].shard("layers.0.input_layernorm.weight", None) is None
