"""Draft-model speculation: a small model with the target's vocabulary guesses k tokens.

The draft keeps its own KV cache in the target's blocks: tensors of its own shape
(num_blocks, block_size, its KV heads, its head size), addressed through the target's block
tables. Two things keep it right:

- Every token the target computes in a step, the draft has computed by the end of it
  (`mirror`, called by the model runner with the step's schedule). So wherever the
  target's cache holds a token's KV, the draft's holds the draft's for the same token —
  prefix-cache hits, chunked prefill, recompute after preemption and rejected guesses need
  nothing of their own.
- After the step, `propose_all` runs k one-token passes for the requests that decode next:
  the last token at its position, then each guess at the next. These write the draft's KV
  past num_computed_tokens, into slots the scheduler set aside (its lookahead). A request
  whose table has no room proposes fewer guesses, never writes outside its blocks.

The two meet: the next step computes exactly the tokens the proposal passes fed the draft
(the last token and the guesses), so the mirror skips the positions the proposal wrote
(`Request.spec_draft_span`) and computes only the rest — for a decode with guesses, the
last guess. Whatever is rejected lies past num_computed_tokens and is overwritten later.

A greedy request gets the draft's argmax (the verifier compares argmaxes); any other gets a
draw from the draft's distribution q under the request's own temperature, top-k, top-p and
min-p, and q goes to the verifier (Sampler.verify) so the output keeps the target's
distribution.
"""

from __future__ import annotations

import torch

from brim.runtime.config import EngineConfig
from brim.runtime.engine.kv_cache_manager import KVCacheManager
from brim.runtime.engine.model_runner import StepInputs, allocate_kv_caches, run_model
from brim.runtime.engine.sampler import Sampler, _draw


class DraftModelProposer:
    def __init__(self, config: EngineConfig, model, num_blocks: int, kv_cache: KVCacheManager,
                 sampler: Sampler) -> None:
        self.k = config.speculative.num_speculative_tokens
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler  # the target's: its generator serves unseeded requests
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.backend = "triton" if self.device.type == "cuda" else "torch"
        self.kv_caches = allocate_kv_caches(config, model.facts, model.facts.num_kv_heads,
                                            num_blocks)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv_caches for t in kv)

    def mirror(self, out) -> None:
        """Bring the draft's cache up to the target's after the step `out` (a
        SchedulerOutput): the step's tokens through the draft, less those a proposal pass
        already wrote (hidden states dropped)."""
        block_size = self.block_size
        step = StepInputs([], [], [], [], [0], [], [])
        for s in out.scheduled:
            request, end = s.request, s.start + s.num_new_tokens
            first = s.start
            span = request.spec_draft_span
            if span is not None and span[0] == s.start:  # proposed for exactly this step
                first = min(span[1], end)
            if first == end:
                continue
            real_end = end - len(s.spec_token_ids)  # then the guesses
            tokens = request.all_token_ids[first:real_end] + s.spec_token_ids[
                max(first - real_end, 0):]
            table = s.block_table
            step.input_ids.extend(tokens)
            step.positions.extend(range(first, end))
            step.slot_mapping.extend(table[p // block_size] * block_size + p % block_size
                                     for p in range(first, end))
            step.block_tables.append(table)
            step.query_start_loc.append(step.query_start_loc[-1] + end - first)
            step.seq_lens.append(end)
        if not step.seq_lens:
            return
        max_blocks = max(len(t) for t in step.block_tables)
        step.block_tables = [t + [0] * (max_blocks - len(t)) for t in step.block_tables]
        run_model(self.model, self.kv_caches, step, self.device, self.backend, block_size)

    @torch.inference_mode()
    def propose_all(self, batch) -> None:
        """Set spec_token_ids (and spec_probs) of each (request, limit) pair: up to
        min(k, limit) guesses to follow request.all_token_ids."""
        block_size = self.block_size
        rows = []
        for request, limit in batch:
            request.spec_token_ids, request.spec_probs = [], None
            table = self.kv_cache.block_table(request.req_id)
            position = request.num_tokens - 1  # the last token: not in any cache yet
            room = len(table) * block_size - position
            n = min(self.k, limit, room)
            if n > 0:
                rows.append(_Row(request, table, position, n))
        if not rows:
            return
        max_blocks = max(len(r.table) for r in rows)
        for r in rows:
            r.padded = r.table + [0] * (max_blocks - len(r.table))
        for j in range(max(r.n for r in rows)):
            active = [r for r in rows if r.n > j]
            positions = [r.position + j for r in active]
            step = StepInputs(
                input_ids=[r.tokens[-1] for r in active],
                positions=positions,
                slot_mapping=[r.table[p // block_size] * block_size + p % block_size
                              for r, p in zip(active, positions)],
                block_tables=[r.padded for r in active],
                query_start_loc=list(range(len(active) + 1)),
                seq_lens=[p + 1 for p in positions],
                logits_rows=list(range(len(active))),
            )
            logits = run_model(self.model, self.kv_caches, step, self.device, self.backend,
                               block_size).float()
            self._choose(active, logits)
        for r in rows:
            r.request.spec_token_ids = r.tokens[1:]
            r.request.spec_draft_span = (r.position, r.position + r.n)
            if r.probs:
                r.request.spec_probs = torch.stack(r.probs)

    def _choose(self, active: list["_Row"], logits: torch.Tensor) -> None:
        """Each active row's next guess: the argmax for greedy requests, else a draw from q."""
        greedy = [i for i, r in enumerate(active) if r.request.params.is_greedy]
        if greedy:
            best = logits[greedy].argmax(dim=-1).tolist()
            for i, token in zip(greedy, best):
                active[i].tokens.append(token)
        sampled = [i for i, r in enumerate(active) if not r.request.params.is_greedy]
        if sampled:
            requests = [active[i].request for i in sampled]
            probs = self.sampler._probs(logits[sampled], requests)
            for row, (i, request) in enumerate(zip(sampled, requests)):
                generator = request.generator or self.sampler.generator
                active[i].tokens.append(_draw(probs[row], generator))
                active[i].probs.append(probs[row])


class _Row:
    """One request's proposal in progress: its tokens from the last real one on."""

    __slots__ = ("request", "table", "padded", "position", "n", "tokens", "probs")

    def __init__(self, request, table: list[int], position: int, n: int) -> None:
        self.request = request
        self.table = table
        self.padded: list[int] = table
        self.position = position
        self.n = n
        self.tokens = [request.all_token_ids[-1]]
        self.probs: list[torch.Tensor] = []
