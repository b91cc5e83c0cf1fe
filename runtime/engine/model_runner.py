"""Turns a scheduled step into flat tensors, runs the model, and samples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from brim.kernels.cpu_attention import CpuAttentionPlan
from brim.kernels.cpu_decode import decode_attention_op
from brim.runtime.config import EngineConfig
from brim.runtime.engine.sampler import Sampler
from brim.runtime.engine.scheduler import SchedulerOutput
from brim.runtime.models.compiled import always_compiled, compile_model, inductor_cache_dir
from brim.runtime.models.llama import AttentionMetadata, LlamaForCausalLM
from brim.runtime.models.loader import TORCH_DTYPES

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    """One step's flat model inputs, on the host (what rank 0 sends the other TP ranks)."""

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    slot_mapping: list[int]  # [num_tokens]: block_id * block_size + offset
    block_tables: list[list[int]]  # [num_seqs][max_blocks], padded with 0
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs]
    logits_rows: list[int]  # rows of the hidden states whose next token is sampled


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, num_blocks: int) -> None:
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.backend = "triton" if self.device.type == "cuda" else "torch"
        num_kv_heads = model.facts.num_kv_heads_per_gpu(config.parallel.tensor_parallel_size)
        self.kv_caches = allocate_kv_caches(config, model.facts, num_kv_heads, num_blocks)
        self.sampler = Sampler(config.seed)
        # A draft model (engine/draft.py) catches up with every step, into its own cache.
        self.draft = None
        if self.device.type == "cpu":
            decode_attention_op()  # built (or loaded) now, not on the first decode
        if config.compiles_model:
            compile_model(model)
            self.compile_now()

    def compile_now(self) -> None:
        """Compile the model's graphs (models/compiled.py) with a step on dummy tokens, so that
        no request waits for the compiler: 8 of them, through the compiled path whatever
        its threshold; the graph serves every count (its token dimension is dynamic). It
        writes the first slots of the cache, which any request that gets them overwrites
        before reading."""
        started = time.perf_counter()
        n = 8
        blocks = list(range(-(-n // self.block_size)))
        slots = list(range(n))  # blocks 0, 1, ... in order: slot i is position i
        with always_compiled():
            self.forward(StepInputs([0] * n, list(range(n)), slots, [blocks], [0, n], [n], []))
        logger.info("model compiled in %.1f s (torch.compile, inductor; cache: %s)",
                    time.perf_counter() - started, inductor_cache_dir())

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[list[int], list]] | None:
        """Run one step.

        Returns, for each request whose step reaches its last token (a partial prefill
        chunk samples nothing), in batch order: its new tokens and a logprobs entry (or
        None) per token. One token, or with speculative guesses the accepted ones and one
        more (Sampler.verify).
        """
        logits = self.forward(self.prepare(out))
        if self.draft is not None:
            self.draft.mirror(out)
        if logits is None:
            return None
        return self.sample(logits, out)

    def sample(self, logits: torch.Tensor, out: SchedulerOutput) -> list[tuple[list[int], list]]:
        """execute's result from the step's logits (rows: see prepare)."""
        sampling = [s for s in out.scheduled if s.samples]
        if not any(s.spec_token_ids for s in sampling):
            result = self.sampler(logits, [s.request for s in sampling])
            return [([token], [lp]) for token, lp in zip(result.token_ids, result.logprobs)]
        # Plain rows sample together; each request with guesses is verified on its rows.
        plain, row, plain_rows, verified = [], 0, [], {}
        for i, s in enumerate(sampling):
            num_rows = 1 + len(s.spec_token_ids)
            if s.spec_token_ids:
                q = s.request.spec_probs  # a draft model's distributions, when it sampled
                if q is not None:
                    q = q[:len(s.spec_token_ids)]
                verified[i] = self.sampler.verify(logits[row:row + num_rows], s.request,
                                                  s.spec_token_ids, draft_probs=q)
            else:
                plain.append(s.request)
                plain_rows.append(row)
            row += num_rows
        results = []
        if plain:
            sampled = self.sampler(logits[torch.tensor(plain_rows, device=logits.device)], plain)
            plain_results = iter(zip(sampled.token_ids, sampled.logprobs))
        for i in range(len(sampling)):
            if i in verified:
                results.append(verified[i])
            else:
                token, lp = next(plain_results)
                results.append(([token], [lp]))
        return results

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        input_ids, positions, slots, query_start, seq_lens, logits_rows = [], [], [], [0], [], []
        block_tables = [s.block_table for s in out.scheduled]
        block_size = self.block_size
        for s in out.scheduled:
            start, end, table = s.start, s.start + s.num_new_tokens, s.block_table
            if end - start == 1 and not s.spec_token_ids:  # a decode: most rows of most steps
                input_ids.append(s.request.all_token_ids[start])
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
                query_start.append(query_start[-1] + 1)
                seq_lens.append(end)
                if end == len(s.request.all_token_ids):  # s.samples
                    logits_rows.append(query_start[-1] - 1)
                continue
            input_ids.extend(s.request.all_token_ids[start:end])
            input_ids.extend(s.spec_token_ids)  # guesses follow the last token
            positions.extend(range(start, end))
            slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, end))
            query_start.append(query_start[-1] + s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                logits_rows.extend(range(query_start[-1] - 1 - len(s.spec_token_ids),
                                         query_start[-1]))
        max_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        return StepInputs(input_ids, positions, slots, padded, query_start, seq_lens,
                          logits_rows)

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor | None:
        """The step through the model: logits [len(logits_rows), vocab], or None when no
        row samples (and on tensor-parallel ranks other than 0)."""
        return run_model(self.model, self.kv_caches, step, self.device, self.backend,
                         self.block_size)


def allocate_kv_caches(config: EngineConfig, facts, num_kv_heads: int,
                       num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), [num_blocks, block_size, num_kv_heads, head_dim] in the
    KV cache's dtype. Zeroed: attention masks unused slots, but a never-written slot must
    not hold NaN bit patterns either."""
    kv_dtype = config.kv_cache_dtype
    dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else TORCH_DTYPES[kv_dtype]
    shape = (num_blocks, config.cache.block_size, num_kv_heads, facts.head_dim)
    device = torch.device(config.device)
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device)) for _ in range(facts.num_layers)]


def run_model(model, kv_caches, step: StepInputs, device: torch.device, backend: str,
              block_size: int) -> torch.Tensor | None:
    """`step` through `model` over its paged `kv_caches`: logits at step.logits_rows, or
    None when there are none."""

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    md = AttentionMetadata(
        slot_mapping=tensor(step.slot_mapping, torch.int64),
        block_tables=tensor(step.block_tables, torch.int32),
        query_start_loc=tensor(step.query_start_loc, torch.int32),
        seq_lens=tensor(step.seq_lens, torch.int32),
        max_seq_len=max(step.seq_lens),
        backend=backend,
    )
    if backend == "torch":  # one plan for every layer of the step
        md.cpu_plan = CpuAttentionPlan.build(md.block_tables, md.query_start_loc,
                                             md.seq_lens, block_size)
    hidden = model(tensor(step.input_ids, torch.int64), tensor(step.positions, torch.int64),
                   kv_caches, md)
    if not step.logits_rows:
        return None
    # Logits only where a token is sampled: the vocab matmul is the largest one.
    return model.compute_logits(hidden[tensor(step.logits_rows, torch.int64)])
