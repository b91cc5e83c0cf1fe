"""The engine is built and stepped on one thread for its whole life (async_engine.EngineThread).

Why it matters: torch's OpenMP runtime keeps a team of worker threads per thread that runs
parallel ops; with two such threads on a 2-core machine it stops spinning between ops and a
decode step got ~50% slower (docs/benchmarks.md). `asyncio.to_thread` moves the step
between pool threads, and `brim serve` used to build the engine on the main thread.
"""

from __future__ import annotations

import asyncio
import threading

from brim.runtime.sampling_params import SamplingParams
from brim.runtime.server.async_engine import AsyncEngine, EngineThread


class ThreadRecorder:
    """Wraps a FakeEngine: records the thread of every engine call that can run torch."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.step_threads: list[int] = []

    def step(self):
        self.step_threads.append(threading.get_ident())
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_steps_run_on_the_thread_that_built_the_engine(fake_engine):
    thread = EngineThread()
    built_on = thread.call(threading.get_ident)
    recorder = ThreadRecorder(fake_engine)

    async def main():
        engine = AsyncEngine(recorder, thread=thread)
        engine.start()
        try:
            # Several requests, one after the other and side by side: many steps, with
            # idle gaps between them (where a pool could hand the next step to a new thread).
            for round_ in range(3):
                streams = [await engine.add(f"r{round_}-{i}", [1, 2, 3],
                                            SamplingParams(max_tokens=4, ignore_eos=True))
                           for i in range(round_ + 1)]
                for stream in streams:
                    async for _ in stream:
                        pass
                await asyncio.sleep(0.05)
        finally:
            await engine.stop()

    asyncio.run(main())
    assert len(recorder.step_threads) >= 12
    assert set(recorder.step_threads) == {built_on}
    assert built_on != threading.get_ident()  # not the event loop's thread either


def test_an_async_engine_without_a_thread_still_steps_on_one(fake_engine):
    recorder = ThreadRecorder(fake_engine)

    async def main():
        engine = AsyncEngine(recorder)
        engine.start()
        try:
            for i in range(4):
                stream = await engine.add(f"r{i}", [1, 2], SamplingParams(max_tokens=3))
                async for _ in stream:
                    pass
                await asyncio.sleep(0.02)
        finally:
            await engine.stop()

    asyncio.run(main())
    assert len(recorder.step_threads) >= 8
    assert len(set(recorder.step_threads)) == 1


def test_brim_serve_builds_the_engine_on_the_engine_thread(monkeypatch):
    """run_serve hands create_engine to the EngineThread it then gives the app."""
    from brim.runtime.cli import serve

    seen = {}

    def fake_create_engine(args):
        seen["built_on"] = threading.current_thread().name
        raise ValueError("stop here")  # run_serve reports it and returns 2

    monkeypatch.setattr(serve, "create_engine", fake_create_engine)
    args = serve_args(["--port", "0", "--host", "127.0.0.1"])
    assert serve.run_serve(args) == 2
    assert seen["built_on"].startswith("brim-engine")


def serve_args(argv):
    import argparse

    from brim.runtime.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


class SlowMetrics:
    """ServerMetrics' interface; update_engine takes `seconds`, as a slow exporter would."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.updates: list[tuple[float, float]] = []

    def update_engine(self, stats) -> None:
        import time

        start = time.monotonic()
        time.sleep(self.seconds)
        self.updates.append((start, time.monotonic()))

    def __getattr__(self, name):  # the observe_* histograms: nothing to record here
        return lambda *args, **kwargs: None


class StepTimes:
    def __init__(self, engine) -> None:
        self._engine = engine
        self.steps: list[tuple[float, float]] = []

    def step(self):
        import time

        start = time.monotonic()
        try:
            return self._engine.step()
        finally:
            self.steps.append((start, time.monotonic()))

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_the_next_step_runs_while_the_last_ones_outputs_are_handed_out(fake_engine):
    """The event loop's work after a step (streams, metrics) overlaps the next step instead of
    holding the engine idle: with a 0.3 s metrics update after every step, some update runs
    while a step does (before, none could: the next step started after them)."""
    fake_engine.step_delay = 0.3
    timed = StepTimes(fake_engine)
    metrics = SlowMetrics(0.3)

    async def main():
        engine = AsyncEngine(timed, metrics=metrics, thread=EngineThread())
        engine.start()
        try:
            stream = await engine.add("r", [1, 2], SamplingParams(max_tokens=4, ignore_eos=True))
            tokens = [len(out.outputs[0].token_ids) async for out in stream]
        finally:
            await engine.stop()
        return tokens

    tokens = asyncio.run(main())
    # Outputs are cumulative and a stream keeps the newest: with the event loop this slow,
    # a reader may see two steps' tokens at once, never fewer or out of order.
    assert tokens[-1] == 4 and tokens == sorted(set(tokens)), tokens
    assert len(timed.steps) == 4
    overlaps = [(u, s) for u in metrics.updates for s in timed.steps
                if u[0] < s[1] and s[0] < u[1]]
    assert overlaps, (metrics.updates, timed.steps)


def test_the_engine_thread_runs_steps_back_to_back_while_the_event_loop_is_busy(fake_engine):
    """A step that ends while the event loop is busy does not wait for it: the engine thread
    starts the next one itself. The event loop here blocks for 0.5 s in a handler-like task
    while steps of 0.05 s keep running; before, the engine idled until the loop was free."""
    import time

    fake_engine.step_delay = 0.05
    timed = StepTimes(fake_engine)

    async def main():
        engine = AsyncEngine(timed, thread=EngineThread())
        engine.start()
        try:
            stream = await engine.add("r", [1, 2], SamplingParams(max_tokens=12, ignore_eos=True))
            await asyncio.sleep(0.06)  # the first step is under way
            busy_from = time.monotonic()
            time.sleep(0.5)  # the event loop does not run: a slow handler, say
            busy_until = time.monotonic()
            tokens = [len(out.outputs[0].token_ids) async for out in stream]
        finally:
            await engine.stop()
        return tokens, busy_from, busy_until

    tokens, busy_from, busy_until = asyncio.run(main())
    assert tokens[-1] == 12
    during = [s for s in timed.steps if busy_from < s[0] and s[1] < busy_until]
    assert len(during) >= 5, (timed.steps, busy_from, busy_until)
