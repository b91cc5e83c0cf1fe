"""Graceful shutdown: SIGTERM stops accepting, lets the requests in flight finish up to
--shutdown-timeout, ends the rest with a last event, and exits 0 without a traceback; and
`brim serve` takes its port before it loads the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import pytest

from brim.runtime.cli import main
from tests.runtime.server.conftest import MODEL, serve
from tests.serve_process import brim_serve


async def stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Queue) -> dict:
    """A completion stream: how it finished, its usage, the error event if any, [DONE]."""
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = {"done": False, "finish": None, "usage": None, "error": None}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            assert not result["done"], "an event after [DONE]"
            if line == "data: [DONE]":
                result["done"] = True
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                result["error"] = event["error"]
            elif event["choices"]:
                result["finish"] = event["choices"][0]["finish_reason"] or result["finish"]
                if started is not None:
                    started.put_nowait(None)
                    started = None
            else:
                result["usage"] = event["usage"]
    return result


async def all_started(started: asyncio.Queue, jobs: list[asyncio.Task]) -> None:
    """Every stream has sent its first chunk (a job that failed raises here)."""
    for _ in jobs:
        getter = asyncio.ensure_future(started.get())
        done, _ = await asyncio.wait([getter, *[j for j in jobs if not j.done()]],
                                     timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for job in jobs:
            if job.done() and job.exception() is not None:
                raise job.exception()
        assert getter in done or await asyncio.wait_for(getter, 60) is None


def check_endings(results: list[dict], num_short: int, max_tokens_short: int) -> None:
    """The short streams finished normally; the long ones ended with the shutdown error."""
    assert all(r["done"] for r in results), "a stream ended without [DONE]"
    for r in results[:num_short]:
        assert (r["finish"], r["error"]) == ("length", None)
        assert r["usage"]["completion_tokens"] == max_tokens_short
    for r in results[num_short:]:
        error = r["error"]
        assert (error["type"], error["code"]) == ("service_unavailable_error", "shutting_down")
        assert error["message"].startswith("The server is shutting down and this request did "
                                           "not finish within its drain timeout of ")


def test_shutdown_drains_then_ends_the_rest_with_a_last_event(fake_engine, tokenizer):
    """In process: what uvicorn does on SIGTERM (should_exit), with the fake engine."""
    fake_engine.step_delay = 0.02  # 50 tokens a second
    with serve(fake_engine, tokenizer=tokenizer, shutdown_timeout=1.0) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                started: asyncio.Queue = asyncio.Queue()
                jobs = [asyncio.create_task(stream(client, 20 if i < 4 else 200, started))
                        for i in range(8)]
                await all_started(started, jobs)
                began = time.monotonic()
                url.server.should_exit = True  # uvicorn's SIGTERM handler
                results = await asyncio.gather(*jobs)
                return results, time.monotonic() - began

        results, seconds = asyncio.run(main())
        check_endings(results, 4, 20)
        assert 1.0 <= seconds < 3.0
        # Nothing is accepted any more.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
        assert not url.state.engine.is_alive or url.server.should_exit


def test_a_taken_port_is_reported_before_the_model_loads(monkeypatch, capsys):
    from brim.runtime.cli import serve as serve_cli

    def never(args):
        raise AssertionError("the model must not load when the port is taken")

    monkeypatch.setattr(serve_cli, "create_engine", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
        assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err == (f"brim serve: cannot listen on 127.0.0.1:{port}: Address already in use. "
                   "Is another server running there? Stop it, or choose another --port.\n")


@pytest.mark.slow
def test_sigterm_during_8_streams(bundled_model_dir, tmp_path):
    """The real `brim serve`: 4 streams finish within the drain, 4 are ended by it; every
    one ends with [DONE]; exit 0 within the timeout; nothing logged at ERROR."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "BRIM_CACHE_DIR": str(bundled_model_dir.parent.parent)}
    drain = 4.0
    args = ["--max-model-len", "1024", "--num-gpu-blocks", "256", "--shutdown-timeout",
            str(drain)]
    with brim_serve(args, log, env=env) as (url, process):
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                started: asyncio.Queue = asyncio.Queue()
                jobs = [asyncio.create_task(stream(client, 24 if i < 4 else 900, started))
                        for i in range(8)]
                await all_started(started, jobs)
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                results = await asyncio.gather(*jobs)
                return results, signalled

        results, signalled = asyncio.run(main())
        rc = process.wait(timeout=drain + 15)
        exited = time.monotonic() - signalled
    text = log.read_text()
    check_endings(results, 4, 24)
    assert rc == 0, text
    assert exited < drain + 10, exited
    assert " ERROR " not in text and "Traceback" not in text, text
    assert "shutting down: the requests in flight get up to 4 s to finish" in text


def test_a_request_added_after_the_drain_is_refused(fake_engine):
    """One still being read when the drain ran out gets the shutdown 503, not a 500."""
    from brim.runtime.sampling_params import SamplingParams
    from brim.runtime.server import serving
    from brim.runtime.server.async_engine import AsyncEngine
    from brim.runtime.server.errors import APIError
    from brim.runtime.server.prompts import Prompt

    async def main():
        engine = AsyncEngine(fake_engine)
        engine.start()
        try:
            engine.end_all(serving.ShutdownError(3))
            job = serving.new_job("completion", MODEL, [Prompt("hi", [1, 2])],
                                  SamplingParams(max_tokens=2), None)
            with pytest.raises(APIError) as info:
                await serving.start(job, engine, time.monotonic(), "prompt")
            return info.value
        finally:
            await engine.stop()

    error = asyncio.run(main())
    assert (error.status_code, error.code) == (503, "shutting_down")
    assert error.message == ("The server is shutting down and this request did not finish "
                             "within its drain timeout of 3 s (--shutdown-timeout). Retry it.")
