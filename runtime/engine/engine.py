"""The engine: requests in, tokens out, one scheduling step at a time.

    add_request -> Scheduler.schedule -> ModelRunner.execute -> Sampler
                -> Scheduler.update (append, stop, free) -> detokenize -> RequestOutput
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from brim.runtime.config import DTYPES, EngineConfig
from brim.runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from brim.runtime.engine.errors import KVCacheTooSmallError, PromptTooLongError
from brim.runtime.engine.kv_cache_manager import KVCacheManager
from brim.runtime.engine.model_runner import ModelRunner
from brim.runtime.engine.outputs import CompletionOutput, Logprob, RequestOutput
from brim.runtime.engine.request import Request
from brim.runtime.engine.scheduler import Scheduler
from brim.runtime.models.llama import LlamaArgs
from brim.runtime.models.loader import load_model, model_weights_bytes
from brim.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """A snapshot for metrics. Counters are cumulative since start-up; token counts."""

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    kv_cache_usage: float  # used / total blocks
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(path, hf_config: dict, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, as transformers uses."""
    ids: set[int] = set()
    sources = [hf_config.get("eos_token_id")]
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_config = config.model
        self.max_model_len = model_config.max_model_len
        started = time.monotonic()
        args = LlamaArgs.from_hf(model_config.hf_config)
        dtype_bytes = DTYPES[model_config.dtype]
        self.kv_bytes_per_token = (2 * args.num_layers * args.num_kv_heads * args.head_dim
                                   * dtype_bytes)
        block_size = config.cache.block_size
        self.measured_memory: dict | None = None
        if config.device == "cpu":
            # Nothing to measure on CPU: refuse a too-small cache before loading weights.
            self.num_gpu_blocks = self._determine_num_blocks()
            self._check_capacity()
        self.tokenizer = load_tokenizer(model_config.path)
        self.model = load_model(model_config.path, model_config.hf_config, model_config.dtype,
                                config.device)
        self.eos_token_ids = eos_token_ids(model_config.path, model_config.hf_config,
                                           self.tokenizer)
        self.vocab_size = args.vocab_size
        if config.device != "cpu":
            self.num_gpu_blocks = self._determine_num_blocks()
            self._check_capacity()
        self.kv_cache = KVCacheManager(self.num_gpu_blocks, block_size,
                                       config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.runner = ModelRunner(config, self.model, self.num_gpu_blocks)
        self.requests: dict[str, Request] = {}  # child req_id -> request
        self.parents: dict[str, list[Request]] = {}  # req_id -> its n children
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        kv_tokens = self.num_gpu_blocks * block_size
        self.memory_report = {
            "device": config.device,
            "weights_bytes": model_weights_bytes(self.model),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "num_gpu_blocks": self.num_gpu_blocks,
            "block_size": block_size,
            "kv_cache_tokens": kv_tokens,
            "kv_cache_bytes": kv_tokens * self.kv_bytes_per_token,
            "max_model_len": self.max_model_len,
            "max_concurrency": kv_tokens / self.max_model_len,
        }
        if self.measured_memory is not None:
            self.memory_report["measured"] = {**self.measured_memory,
                                              "num_gpu_blocks": self.num_gpu_blocks}
            predicted = self._predicted_memory()
            self.memory_report["predicted"] = predicted
            if predicted is not None:
                logger.info(
                    "KV blocks predicted %d, measured %d; non-KV memory predicted %.2f GiB, "
                    "measured %.2f GiB", predicted["num_gpu_blocks"], self.num_gpu_blocks,
                    predicted["non_kv_bytes"] / 2**30,
                    self.measured_memory["non_kv_bytes"] / 2**30)
        logger.info(
            "model %s loaded in %.1f s: weights %.2f GiB (%s) on %s",
            model_config.path.name, time.monotonic() - started,
            self.memory_report["weights_bytes"] / 2**30, model_config.dtype, config.device,
        )
        logger.info(
            "# GPU blocks: %d (%d tokens, %.2f GiB KV cache); maximum concurrency at "
            "max_model_len=%d: %.2fx",
            self.num_gpu_blocks, kv_tokens, self.memory_report["kv_cache_bytes"] / 2**30,
            self.max_model_len, self.memory_report["max_concurrency"],
        )

    # -- sizing ---------------------------------------------------------------------------

    def _check_capacity(self) -> None:
        """Refuse a KV cache that cannot hold one max_model_len request, or, when
        max_model_len was "auto", lower it to what the cache holds."""
        block_size = self.config.cache.block_size
        capacity = self.num_gpu_blocks * block_size
        if capacity >= self.max_model_len:
            return
        if self.config.model.auto_max_model_len and capacity > 0:
            logger.warning("max_model_len auto: the model's %d tokens do not fit the KV cache; "
                           "serving with max_model_len=%d, what the KV cache holds",
                           self.max_model_len, capacity)
            self._set_max_model_len(capacity)
            return
        hint = ("raise num_gpu_blocks" if self.config.device == "cpu"
                else "raise gpu_memory_utilization or use a GPU with more memory")
        raise KVCacheTooSmallError(self.num_gpu_blocks, block_size, self.max_model_len, hint)

    def _set_max_model_len(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.config.model.max_model_len = max_model_len
        scheduler = self.config.scheduler
        scheduler.max_model_len = max_model_len
        # Keep SchedulerConfig's rule: a step never holds more than every sequence's tokens.
        scheduler.max_num_batched_tokens = min(scheduler.max_num_batched_tokens,
                                               scheduler.max_num_seqs * max_model_len)

    def _predicted_memory(self) -> dict | None:
        """The operator's prediction for this GPU, to log beside the measurement."""
        if self.config.device != "cuda":
            return None
        from brim.runtime.sizing import plan

        total = torch.cuda.mem_get_info()[1]
        try:
            predicted = plan(
            str(self.config.model.path),
            gpu_memory_bytes=total,
            gpu_memory_utilization=self.config.cache.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            max_num_seqs=self.config.scheduler.max_num_seqs,
            max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
            block_size=self.config.cache.block_size,
            dtype=self.config.model.dtype,
            )
        except (ValueError, KeyError) as exc:  # a prediction never stops a measured start
            logger.warning("could not predict memory for comparison: %s", exc)
            return None
        return predicted.to_dict()

    def _determine_num_blocks(self) -> int:
        cache = self.config.cache
        block_bytes = self.kv_bytes_per_token * cache.block_size
        if self.config.device == "cpu":
            import psutil

            # CPU: a documented share (cpu_kv_cache_fraction, 10% by default) of the RAM
            # available now, but no more than every sequence at max_model_len could use.
            budget = psutil.virtual_memory().available * cache.cpu_kv_cache_fraction
            most_useful = self.config.scheduler.max_num_seqs * -(-self.max_model_len // cache.block_size)
            num_blocks = min(int(budget // block_bytes), most_useful)
        else:
            num_blocks = self._measure_cuda_num_blocks(block_bytes)
        if cache.num_gpu_blocks is not None:
            num_blocks = min(num_blocks, cache.num_gpu_blocks) if self.config.device == "cuda" \
                else cache.num_gpu_blocks
        return max(num_blocks, 0)

    def _measure_cuda_num_blocks(self, block_bytes: int) -> int:
        """Measure, not guess: peak memory of a profiling forward of max_num_batched_tokens."""
        from brim.runtime.engine.profiling import measure_kv_budget

        budget, measured = measure_kv_budget(self)
        self.measured_memory = measured
        return int(budget // block_bytes)

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        prompt: str | None = None,
        cache_salt: str | None = None,
    ) -> None:
        params = params or SamplingParams()
        if req_id in self.parents:
            raise ValueError(f"request id {req_id!r} is already in use")
        prompt_len = len(prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}"
            )
        if prompt_len >= self.max_model_len:
            raise PromptTooLongError(prompt_len, None, self.max_model_len)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise PromptTooLongError(prompt_len, max_tokens, self.max_model_len)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=params.seed + index)
            child_id = req_id if params.n == 1 else f"{req_id}#{index}"
            request = Request(child_id, prompt_token_ids, child_params, max_tokens=max_tokens,
                              eos_token_ids=self.eos_token_ids, prompt=prompt, parent_id=req_id,
                              index=index, cache_salt=cache_salt)
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                         params.skip_special_tokens)
            children.append(request)
        self.parents[req_id] = children
        for request in children:
            self.requests[request.req_id] = request
            self.scheduler.add(request)

    def abort(self, req_id: str) -> None:
        """Stop a request now; its blocks go back to the pool before this returns."""
        for request in self.parents.pop(req_id, ()):
            self.scheduler.finish(request, "abort")
            self.requests.pop(request.req_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        tables = [self.kv_cache.block_table(s.request.req_id) for s in out.scheduled]
        sampled = self.runner.execute(out, tables)
        sampled_map, logprob_map = {}, {}
        if sampled is not None:
            sampling = [s.request for s in out.scheduled if s.samples]
            for request, token, lp in zip(sampling, sampled.token_ids, sampled.logprobs):
                sampled_map[request.req_id] = token
                logprob_map[request.req_id] = lp
        advanced = self.scheduler.update(out, sampled_map)

        now = time.monotonic()
        touched = {}
        for request in advanced:
            self._process_token(request, logprob_map.get(request.req_id))
            if request.first_token_time is None:
                request.first_token_time = now
                if request.index == 0:  # n children share one prompt
                    self.num_prompt_tokens += request.num_prompt_tokens
            self.num_generation_tokens += 1
            touched[request.parent_id] = True
        return [self._output(parent_id) for parent_id in touched]

    def _process_token(self, request: Request, logprob) -> None:
        token = request.all_token_ids[-1]
        if logprob is not None:
            chosen_lp, rank, top_ids, top_lps = logprob
            entry = {token: Logprob(chosen_lp, rank, self.tokenizer.decode([token]))}
            for r, (tid, lp) in enumerate(zip(top_ids, top_lps), start=1):
                entry.setdefault(tid, Logprob(lp, r, self.tokenizer.decode([tid])))
            request.logprobs.append(entry)
            request.cumulative_logprob += chosen_lp
        if request.finish_reason == "stop":
            return  # a stop token's text is not part of the output
        delta = request.detokenizer.add(token)
        if not delta:
            return
        request.text += delta
        params = request.params
        if params.stop and request.num_output_tokens >= params.min_tokens:
            hit = find_stop(request.text, len(delta), params.stop)
            if hit is not None:
                index, stop = hit
                end = index + len(stop) if params.include_stop_str_in_output else index
                request.text = request.text[:end]
                # A no-op if max_tokens ended it in this same step; the stop string still
                # names the reason, as the text was cut at it.
                self.scheduler.finish(request, "stop", stop)
                request.finish_reason, request.stop_reason = "stop", stop

    def _output(self, parent_id: str) -> RequestOutput:
        children = self.parents[parent_id]
        first = children[0]
        outputs = [
            CompletionOutput(
                index=r.index,
                text=r.text,
                token_ids=r.output_token_ids,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                cumulative_logprob=r.cumulative_logprob if r.logprobs is not None else None,
                logprobs=list(r.logprobs) if r.logprobs is not None else None,
            )
            for r in children
        ]
        finished = all(r.is_finished for r in children)
        if finished:
            del self.parents[parent_id]
            for r in children:
                self.requests.pop(r.req_id, None)
        return RequestOutput(parent_id, first.prompt, first.prompt_token_ids, outputs, finished,
                             first.num_cached_tokens)

    def get_stats(self) -> EngineStats:
        pool = self.kv_cache.pool
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_total_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_used_blocks=pool.num_used_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            kv_cache_usage=pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            prefix_cache_queries=self.kv_cache.num_queried_tokens,
            prefix_cache_hits=self.kv_cache.num_hit_tokens,
        )
