"""The engine loop: one asyncio task drives the synchronous engine beside the HTTP server.

The engine is single-threaded and not thread-safe, so exactly one place touches it: the
loop task. Each turn it applies the aborts and adds handlers have queued, then has the
engine thread run `engine.step()` back to back until handlers queue more (the event loop
keeps serving while the forward passes run); each step's cumulative outputs reach their
streams through the event loop as the step ends. Handlers never call the
engine; they call `add()` and iterate the `RequestStream` it returns.

The engine thread (`EngineThread`) is one thread for the engine's whole life: `brim serve`
builds the engine on it too. On CPU this is worth a third of the step time: torch's OpenMP
(libgomp) keeps a team of worker threads per thread that runs parallel ops, and once the
process holds more such threads than cores it stops spinning between ops and sleeps on a
futex instead, waking ~20 times per layer. Built in the main thread and stepped in
`asyncio.to_thread`'s pool (two teams on two cores), a SmolLM2 decode step took ~30 ms
against ~20 ms offline (docs/benchmarks.md).

    handler --add()--> pending adds --+
    handler --abort()--> pending aborts --+--> [loop: apply, steps in thread] --> streams
                                                 (each step's outputs: call_soon_threadsafe)
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from brim.runtime.engine.admission import Limits, admit_all
from brim.runtime.engine.errors import EngineDeadError
from brim.runtime.engine.outputs import RequestOutput
from brim.runtime.planner.report import MemoryReport
from brim.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed during a step; the requests in flight were aborted."""


class EngineThread:
    """The one thread that builds and steps the engine (why one: the module docstring)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="brim-engine")

    def call(self, fn, *args):
        """fn(*args) on the engine thread, blocking the caller (start-up)."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn, *args):
        """fn(*args) on the engine thread, awaited."""
        return await self.submit(fn, *args)

    def submit(self, fn, *args) -> asyncio.Future:
        """fn(*args) on the engine thread, starting now (not when the caller next awaits)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class _PendingAdd:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    accepted: asyncio.Future  # set once the engine took (or refused) the request
    cache_salt: str | None = None


@dataclass(slots=True)
class _Timing:
    """Per-request timestamps (time.monotonic) for the latency histograms."""

    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0  # generated so far, over all n completions


class RequestStream:
    """The outputs of one request, newest wins.

    Outputs are cumulative, so a consumer slower than the engine only needs the latest:
    the stream keeps one slot instead of a queue that would grow with a stalled client.
    """

    def __init__(self, owner: "AsyncEngine", req_id: str) -> None:
        self._owner = owner
        self.req_id = req_id
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._latest = item
        self._ready.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop generating (client gone, handler failed); a no-op once finished."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.req_id)


class AsyncEngine:
    """Owns the engine and the loop task that drives it: the server's only way to the engine.

    engine: anything with the Engine contract (add_request, step, abort,
        has_unfinished_requests, get_stats, and the attributes limits, memory_report,
        model_path).
    metrics: a ServerMetrics updated after every step, or None.
    thread: the EngineThread the engine was built on (a new one if None).

    limits: what every request is checked against (admission.Limits).
    memory_report: how the engine sized its KV cache (planner.report.MemoryReport).
    model_path: the checkpoint folder (the server loads its own tokenizer from it).
    """

    def __init__(self, engine, metrics=None, thread: EngineThread | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.thread = thread or EngineThread()
        self.limits: Limits = engine.limits
        self.memory_report: MemoryReport = engine.memory_report
        self.model_path: Path = Path(engine.model_path)
        self._streams: dict[str, RequestStream] = {}
        self._timings: dict[str, _Timing] = {}
        self._pending_adds: list[_PendingAdd] = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ended: Exception | None = None  # set by end_all: later adds are refused with it
        self.dead: EngineDeadError | None = None  # why the engine can run no further step
        self.on_dead = None  # called with that error (brim serve: exit)
        self.stats = engine.get_stats()
        self.num_steps = 0
        self._stopping = False  # read by the engine thread between steps

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="brim-engine-loop")
        if self.metrics is not None:
            self.metrics.update_engine(self.stats)

    async def stop(self) -> None:
        self._stopping = True  # the engine thread ends its run of steps after the current one
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds not applied yet."""
        return self.stats.num_waiting + len(self._pending_adds)

    # -- requests -------------------------------------------------------------------------

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """The engine's admission rules for one API request's prompts, applied now (they
        hold as long as the engine does): raises what `add` would for each, or what the
        request asks for in all (admission.admit_all), without queueing anything."""
        admit_all(prompts, params, self.limits)

    async def add(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it.

        Raises what `engine.add_request` raises (ValueError, PromptTooLongError).
        """
        if self._ended is not None:
            raise self._ended
        if not self.is_alive:
            raise EngineStepError("the engine loop is not running")
        accepted = asyncio.get_running_loop().create_future()
        stream = RequestStream(self, req_id)
        self._streams[req_id] = stream
        self._timings[req_id] = _Timing(arrival_time or time.monotonic(), len(prompt_token_ids))
        self._pending_adds.append(_PendingAdd(req_id, prompt_token_ids, params, prompt, accepted,
                                               cache_salt))
        self._wakeup.set()
        try:
            await accepted
        except asyncio.CancelledError:
            # Cancelled before the loop applied it: the loop skips cancelled adds. Cancelled
            # after: the engine has it, so take it back out.
            if accepted.done() and not accepted.cancelled():
                self.abort(req_id)
            else:
                accepted.cancel()
                self._forget(req_id)
            raise
        except BaseException:
            self._forget(req_id)
            raise
        return stream

    def abort(self, req_id: str) -> None:
        """Abort before the next step; its KV blocks are free once that step starts."""
        if self._forget(req_id) and self.metrics is not None:
            self.metrics.observe_finished_reason("abort")
        self._pending_aborts.append(req_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def end_all(self, error: Exception) -> None:
        """End every request in flight now: each stream raises `error` (shutdown past its
        drain timeout); the engine drops them before its next step. Later adds raise it too."""
        self._ended = error
        for req_id, stream in list(self._streams.items()):
            stream.put(error)
            self.abort(req_id)

    def _forget(self, req_id: str) -> bool:
        self._streams.pop(req_id, None)
        return self._timings.pop(req_id, None) is not None

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        """Step while there is work. The engine thread runs steps back to back (`_launch`),
        handing each step's outputs to the event loop as it ends (`_on_step`: streams and
        metrics run there while the engine computes the next step); it comes back here only
        when handlers queued aborts or adds, which are applied in the gap, when no step runs
        (the engine is not thread-safe), or when nothing is left to do."""
        engine = self.engine
        while True:
            if self._apply_pending():
                self._update_stats()  # the waiting count includes what was just added
            if not engine.has_unfinished_requests():
                self._update_stats()
                self._wakeup.clear()
                if not self._pending_adds and not self._pending_aborts:
                    await self._wakeup.wait()
                continue
            try:
                await self._launch()
            except EngineDeadError as exc:  # nothing will run again: fail all, then stop
                logger.critical("the engine is dead: %s", exc)
                self.dead = exc
                self._ended = EngineStepError(f"the engine is dead: {exc}")
                self._fail_all(self._ended)
                if self.on_dead is not None:
                    self.on_dead(exc)
                return
            except Exception as exc:  # one bad step must not take the server down
                logger.exception("engine step failed; aborting the %d requests in flight",
                                 len(self._streams))
                self._fail_all(EngineStepError(f"the engine failed during a step: {exc!r}"))

    def _launch(self) -> asyncio.Future:
        """Steps on the engine thread until handlers queue something or no work is left.

        The engine does not wait for the event loop between steps: with a step ending while
        the loop is busy (writing a batch of SSE chunks, parsing requests, or descheduled by
        the load generator on a small machine), a loop that started each step itself left
        the engine idle until it got round to it, ~12% of a c=8 run's engine time on 2 cores.
        Reading the pending lists from this thread is safe (a list's truth is atomic under
        the GIL); a step more or less before they are applied changes nothing."""
        engine = self.engine
        loop = asyncio.get_running_loop()

        def steps():
            while True:
                start = time.monotonic()
                outputs = engine.step()
                stats = engine.get_stats()
                loop.call_soon_threadsafe(self._on_step, outputs, stats, start, time.monotonic())
                if (self._pending_adds or self._pending_aborts or self._stopping
                        or not engine.has_unfinished_requests()):
                    return

        return self.thread.submit(steps)

    def _on_step(self, outputs: list[RequestOutput], stats, step_start: float,
                 step_end: float) -> None:
        """On the event loop, after each step (its stats taken right after it)."""
        self.num_steps += 1
        self.stats = stats
        if self.metrics is not None:
            self.metrics.update_engine(stats)
        self._dispatch(outputs, step_start, step_end)

    def _apply_pending(self) -> bool:
        """Aborts first (they free blocks), then adds; True if there was anything."""
        engine = self.engine
        aborts, self._pending_aborts = self._pending_aborts, []
        for req_id in aborts:
            try:
                engine.abort(req_id)
            except Exception:
                logger.exception("aborting request %s failed", req_id)
        adds, self._pending_adds = self._pending_adds, []
        for add in adds:
            if add.accepted.cancelled():
                continue
            try:
                engine.add_request(add.req_id, add.prompt_token_ids, add.params, prompt=add.prompt,
                                   cache_salt=add.cache_salt)
            except Exception as exc:
                add.accepted.set_exception(exc)
            else:
                add.accepted.set_result(None)
        return bool(aborts or adds)

    def _dispatch(self, outputs: list[RequestOutput], step_start: float, step_end: float) -> None:
        for output in outputs:
            timing = self._timings.get(output.req_id)
            if timing is not None and self.metrics is not None:
                self._observe(output, timing, step_start, step_end)
            stream = self._streams.get(output.req_id)
            if stream is not None:
                stream.put(output)
            if output.finished:
                self._forget(output.req_id)

    def _observe(self, output: RequestOutput, timing: _Timing, step_start: float,
                 now: float) -> None:
        metrics = self.metrics
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        if num_tokens > timing.num_tokens:
            if timing.first_token is None:
                metrics.observe_first_token(now - timing.arrival, step_start - timing.arrival)
            else:
                metrics.observe_inter_token(now - timing.last_token)
            timing.first_token = timing.first_token or now
            timing.last_token = now
            timing.num_tokens = num_tokens
        if output.finished:
            reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "stop")
            metrics.observe_finished(now - timing.arrival, timing.num_prompt_tokens, num_tokens,
                                     reason)

    def _fail_all(self, error: Exception) -> None:
        for req_id, stream in list(self._streams.items()):
            stream.put(error)
            if self._forget(req_id) and self.metrics is not None:
                self.metrics.observe_finished_reason("error")
            try:
                self.engine.abort(req_id)
            except Exception:
                logger.exception("aborting request %s after a failed step failed", req_id)

    def _update_stats(self) -> None:
        self.stats = self.engine.get_stats()
        if self.metrics is not None:
            self.metrics.update_engine(self.stats)
