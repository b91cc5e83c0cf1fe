"""The engine: requests in, tokens out, one scheduling step at a time.

    add_request -> Scheduler.schedule -> ModelRunner.execute -> Sampler
                -> Scheduler.update (append, stop, free) -> detokenize -> RequestOutput

One request must not fail the others. Admission (`admission.py`) refuses, when a request
is added, every value a step would choke on. Should a step still raise, the engine runs
its batch again in halves until each request that makes it raise is alone: those finish
with finish_reason "error" (a FailedRequestOutput saying why), the others get exactly
the tokens the step would have given them (seeded generators are rewound before each
retry) and carry on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

from brim.runtime.config import EngineConfig
from brim.runtime.engine.admission import Limits, RequestLimits, admit
from brim.runtime.engine.cache_sizing import fit_max_model_len, size_kv_cache
from brim.runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from brim.runtime.engine.errors import EngineDeadError
from brim.runtime.engine.kv_cache_manager import KVCacheManager
from brim.runtime.engine.model_runner import ModelRunner
from brim.runtime.engine.outputs import CompletionOutput, Logprob, RequestOutput
from brim.runtime.engine.request import Request
from brim.runtime.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from brim.runtime.engine.speculative import AcceptanceBackOff, NgramProposer
from brim.runtime.models.loader import load_model, model_weights_bytes
from brim.runtime.sampling_params import SEED_MAX, SEED_MIN, SamplingParams

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
    # Speculative decoding (zero when off): see Engine.__init__.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0


@dataclass(slots=True)
class FailedRequestOutput(RequestOutput):
    """The last output of a request the engine finished because a step failed on it.

    Its completions end with finish_reason "error"; error says what raised.
    """

    error: str = ""


# A step's sampled tokens: req_id -> (its new token ids, a logprobs entry or None per token).
Sampled = dict[str, tuple[list[int], list]]


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class Engine:
    """Requests in, outputs out, one `step()` at a time.

    Start-up is the same four steps on every device: load the weights and tokenizer, size
    the KV cache (measured on CUDA, a share of RAM on CPU: `memory_report`), fit
    max_model_len to it (lowered when it was "auto", else refused), build the scheduler
    and the model runner.
    """

    def __init__(self, config: EngineConfig,
                 request_limits: RequestLimits | None = None) -> None:
        started = time.monotonic()
        # Tensor parallelism: ranks 1..N-1 start in their own processes (engine/workers.py)
        # and do the same start-up beside this one, rank 0.
        self.workers = None
        if config.parallel.tensor_parallel_size > 1:
            from brim.runtime.engine.workers import TensorParallelWorkers

            self.workers = TensorParallelWorkers(config)
        try:
            self._start(config, request_limits)
        except BaseException:
            self.shutdown()
            raise
        self._log_start(time.monotonic() - started)

    def _start(self, config: EngineConfig, request_limits: RequestLimits | None) -> None:
        model_config, workers = config.model, self.workers
        self.model = load_model(model_config.path, model_config.facts, model_config.dtype,
                                config.device, group=workers and workers.group,
                                quantization=model_config.quantization)
        self.tokenizer = load_tokenizer(model_config.path)
        weights = model_weights_bytes(self.model)
        draft_model = None
        if config.draft_model is not None:  # loaded before sizing: its weights count too
            draft = config.draft_model
            draft_model = load_model(draft.path, draft.facts, draft.dtype, config.device,
                                     quantization=draft.quantization)
            weights += model_weights_bytes(draft_model)
        measured: list[int] = []  # this rank's block count before the ranks agree

        def agree(num_blocks: int) -> int:
            measured.append(num_blocks)
            return workers.agree(num_blocks)

        self.memory_report = size_kv_cache(config, self.model, weights,
                                           agree=agree if workers else None)
        self.config = fit_max_model_len(config, self.memory_report)
        self.kv_cache = KVCacheManager(self.num_gpu_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        spec = self.config.speculative
        # A draft model writes its guesses' KV after the step: the scheduler sets slots aside.
        lookahead = spec.num_speculative_tokens if draft_model is not None else 0
        self.scheduler = Scheduler(self.config.scheduler, self.kv_cache, lookahead)
        if workers is None:
            self.runner = ModelRunner(self.config, self.model, self.num_gpu_blocks)
        else:
            from brim.runtime.engine.workers import RankReport, kv_cache_bytes

            self.runner = workers.runner(self.config, self.model, self.num_gpu_blocks)
            workers.collect_reports(RankReport(0, weights, self.model.load_stats.num_bytes_read,
                                               measured[0], kv_cache_bytes(self.runner)))

        # The tokenizer may name an EOS of its own beside config.json's and
        # generation_config.json's; transformers stops at any of them.
        eos = model_config.checkpoint.eos_token_ids
        if isinstance(self.tokenizer.eos_token_id, int):
            eos |= {self.tokenizer.eos_token_id}
        self.eos_token_ids = eos
        self.limits = Limits(self.max_model_len, model_config.facts.vocab_size,
                             request_limits or RequestLimits())
        self.parents: dict[str, list[Request]] = {}  # req_id -> its n children
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.proposer = None
        if draft_model is not None:
            from brim.runtime.engine.draft import DraftModelProposer

            self.proposer = DraftModelProposer(self.config, draft_model, self.num_gpu_blocks,
                                               self.kv_cache, self.runner.sampler)
            self.runner.draft = self.proposer
        elif spec is not None:
            self.proposer = NgramProposer(spec)
        self.num_spec_drafts = 0  # steps in which a request had guesses checked
        self.num_spec_draft_tokens = 0  # guesses checked
        self.num_spec_accepted_tokens = 0
        self.num_spec_emitted_tokens = 0  # accepted + the target's own, over those steps

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; a TP=1 engine has none)."""
        if self.workers is not None:
            self.workers.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def num_gpu_blocks(self) -> int:
        return self.memory_report.num_gpu_blocks

    @property
    def model_path(self):
        return self.config.model.path

    def _log_start(self, seconds: float) -> None:
        report = self.memory_report
        logger.info("model %s loaded in %.1f s: weights %.2f GiB (%s) on %s",
                    self.config.model.path.name, seconds, report.weights_bytes / 2**30,
                    self.config.model.dtype, self.config.device)
        if self.workers is not None:
            for r in self.workers.reports:
                logger.info("tensor-parallel rank %d: weights %.3f GiB (read %.3f GiB of the "
                            "checkpoint), KV cache %.3f GiB (%d blocks measured, %d agreed)",
                            r.rank, r.weights_bytes / 2**30, r.num_bytes_read / 2**30,
                            r.kv_cache_bytes / 2**30, r.num_gpu_blocks, report.num_gpu_blocks)
        if report.predicted is not None and report.measured is not None:
            logger.info("KV blocks predicted %d, measured %d; non-KV memory predicted %.2f GiB, "
                        "measured %.2f GiB", report.predicted.num_gpu_blocks,
                        report.measured.num_gpu_blocks, report.predicted.non_kv_bytes / 2**30,
                        report.measured.non_kv_bytes / 2**30)
        logger.info("# GPU blocks: %d (%d tokens, %.2f GiB KV cache); maximum concurrency at "
                    "max_model_len=%d: %.2fx", report.num_gpu_blocks, report.kv_cache_tokens,
                    report.kv_cache_bytes / 2**30, self.max_model_len, report.max_concurrency)

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
        max_tokens = admit(prompt_token_ids, params, self.limits)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=_child_seed(params.seed, index))
            child_id = req_id if params.n == 1 else f"{req_id}#{index}"
            request = Request(child_id, prompt_token_ids, child_params, max_tokens=max_tokens,
                              eos_token_ids=self.eos_token_ids, prompt=prompt, parent_id=req_id,
                              index=index, cache_salt=cache_salt)
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                         params.skip_special_tokens)
            children.append(request)
        self.parents[req_id] = children
        for request in children:
            self.scheduler.add(request)

    def abort(self, req_id: str) -> None:
        """Stop a request now; its blocks go back to the pool before this returns."""
        for request in self.parents.pop(req_id, ()):
            self.scheduler.finish(request, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        sampled, errors = self._execute(out)
        failed: dict[str, Exception] = {}  # parent_id -> what raised
        for s in out.scheduled:
            error = errors.get(s.request.req_id)
            if error is not None:
                self._uncache_step_blocks(s)
                failed.setdefault(s.request.parent_id, error)
        for parent_id in failed:
            self._finish_parent(parent_id)
        self._count_speculation(out, sampled)
        advanced = self.scheduler.update(out, {r: tokens for r, (tokens, _) in sampled.items()})

        now = time.monotonic()
        touched = {}
        for request, num_new in advanced:
            if request.parent_id in failed:
                continue
            try:
                self._process_tokens(request, num_new, sampled[request.req_id][1])
            except Exception as exc:  # detokenizing or logprobs: this request's alone
                failed[request.parent_id] = exc
                self._finish_parent(request.parent_id)
                continue
            if request.first_token_time is None:
                request.first_token_time = now
                if request.index == 0:  # n children share one prompt
                    self.num_prompt_tokens += request.num_prompt_tokens
            if not request.final_only or request.is_finished:
                touched[request.parent_id] = True
        if self.proposer is not None:
            self._propose()
        outputs = [self._failed_output(parent_id, error) for parent_id, error in failed.items()]
        for parent_id in touched:
            if parent_id in failed:
                continue
            children = self.parents[parent_id]
            if children[0].final_only and not all(r.is_finished for r in children):
                continue  # "final_only": its other completions are still running
            outputs.append(self._output(parent_id))
        return outputs

    # -- speculative decoding ---------------------------------------------------------------

    def _propose(self) -> None:
        """Guesses for every running request that decodes next step (speculative.py),
        bounded so that the tokens a step may emit stay within max_tokens and
        max_model_len."""
        max_len = self.max_model_len
        batch = []
        for request in self.scheduler.running:
            request.spec_token_ids, request.spec_draft_span = [], None
            if request.num_tokens - request.num_computed_tokens != 1:
                continue
            if request.spec_backoff is not None and not request.spec_backoff.wants_guesses():
                continue  # its guesses keep failing: a few plain steps
            limit = min(request.max_tokens - request.num_output_tokens,
                        max_len - request.num_tokens) - 1
            if limit > 0:
                batch.append((request, limit))
        try:
            self.proposer.propose_all(batch)
        except EngineDeadError:
            raise
        except Exception:  # guesses only save steps: without them nothing is lost
            logger.exception("speculative proposal over %d requests failed; this step "
                             "decodes without guesses", len(batch))
            for request, _ in batch:
                request.spec_token_ids, request.spec_probs = [], None
                request.spec_draft_span = None

    def _count_speculation(self, out: SchedulerOutput, sampled: Sampled) -> None:
        for s in out.scheduled:
            if s.spec_token_ids and s.request.req_id in sampled:
                emitted = len(sampled[s.request.req_id][0])
                self.num_spec_drafts += 1
                self.num_spec_draft_tokens += len(s.spec_token_ids)
                self.num_spec_accepted_tokens += emitted - 1
                self.num_spec_emitted_tokens += emitted
                if s.request.spec_backoff is None:
                    s.request.spec_backoff = AcceptanceBackOff()
                s.request.spec_backoff.record(len(s.spec_token_ids), emitted - 1)

    # -- isolation ------------------------------------------------------------------------

    def _execute(self, out: SchedulerOutput) -> tuple[Sampled, dict[str, Exception]]:
        """Forward and sample the step: the sampled tokens, and req_id -> error for the
        requests the step fails on.

        A batch that raises is split in halves, each run again (rewinding its seeded
        generators first), until every request that makes it raise runs alone: a
        request that fails alone is the culprit. k culprits among n requests cost about
        2k log2(n) extra runs; the KV of a rerun is rewritten with the same values.
        """
        rewind = {s.request.req_id: s.request.generator.get_state() for s in out.scheduled
                  if s.request.generator is not None}
        try:
            return self._run(out.scheduled), {}
        except EngineDeadError:
            raise  # no request is to blame: nothing runs any more
        except Exception as exc:
            logger.warning("engine step over %d requests failed (%r); running it again in "
                           "parts to find the request(s) it fails on", len(out.scheduled), exc)
            pending = [(out.scheduled, exc)]
        sampled: Sampled = {}
        errors: dict[str, Exception] = {}
        while pending:
            batch, error = pending.pop()
            if len(batch) == 1:
                errors[batch[0].request.req_id] = error
                continue
            middle = len(batch) // 2
            for part in (batch[:middle], batch[middle:]):
                for s in part:
                    if s.request.req_id in rewind:
                        s.request.generator.set_state(rewind[s.request.req_id])
                try:
                    sampled.update(self._run(part))
                except EngineDeadError:
                    raise
                except Exception as exc:
                    pending.append((part, exc))
        for req_id, error in errors.items():
            logger.error("request %s fails the engine step by itself; finishing it with an "
                         "error, the other requests carry on", req_id, exc_info=error)
        return sampled, errors

    def _run(self, scheduled: list[ScheduledRequest]) -> Sampled:
        result = self.runner.execute(SchedulerOutput(scheduled=scheduled))
        if result is None:
            return {}
        sampling = [s.request.req_id for s in scheduled if s.samples]
        return dict(zip(sampling, result))

    def _uncache_step_blocks(self, s: ScheduledRequest) -> None:
        """The blocks a failed step was to fill may hold stale KV: the prefix cache must
        not hand them out (they were registered when allocated)."""
        self.kv_cache.uncache(s.block_table[s.start // self.kv_cache.block_size:])

    def _finish_parent(self, parent_id: str) -> None:
        for request in self.parents[parent_id]:
            self.scheduler.finish(request, "error")  # a no-op for those already finished

    def _failed_output(self, parent_id: str, error: Exception) -> FailedRequestOutput:
        output = self._output(parent_id)
        values = {f.name: getattr(output, f.name) for f in fields(output)}
        return FailedRequestOutput(**values, error=repr(error))

    def _process_tokens(self, request: Request, num_new: int, logprobs: list) -> None:
        """Detokenize and check stop strings for the request's num_new newest tokens, in
        order; a stop string ends it there and drops the tokens after it."""
        first = request.num_tokens - num_new
        for i in range(num_new):
            position = first + i
            stopped = self._process_token(request, request.all_token_ids[position],
                                          logprobs[i], is_last=position == request.num_tokens - 1)
            self.num_generation_tokens += 1
            if stopped:
                del request.all_token_ids[position + 1:]  # the tokens after a stop string
                return

    def _process_token(self, request: Request, token: int, logprob, is_last: bool) -> bool:
        """Logprobs, text and stop strings for one new token; True if a stop string ended
        the request at it."""
        if logprob is not None:
            chosen_lp, rank, top_ids, top_lps = logprob
            entry = {token: Logprob(chosen_lp, rank, self.tokenizer.decode([token]))}
            for r, (tid, lp) in enumerate(zip(top_ids, top_lps), start=1):
                entry.setdefault(tid, Logprob(lp, r, self.tokenizer.decode([tid])))
            request.logprobs.append(entry)
            request.cumulative_logprob += chosen_lp
        if is_last and request.finish_reason == "stop":
            # The scheduler ended it at this token (EOS or a stop token id): a stop token's
            # text is not part of the output. (Earlier tokens of the step still are.)
            return False
        delta = request.detokenizer.add(token)
        if not delta:
            return False
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
                return True
        return False

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
            spec_drafts=self.num_spec_drafts,
            spec_draft_tokens=self.num_spec_draft_tokens,
            spec_accepted_tokens=self.num_spec_accepted_tokens,
            spec_emitted_tokens=self.num_spec_emitted_tokens,
        )


def _child_seed(seed: int, index: int) -> int:
    """The seed of a request's index-th completion: seed + index, kept a signed 64-bit
    integer (wrapping) so that a seed near the top of the range still works."""
    return (seed + index - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
