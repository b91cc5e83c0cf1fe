"""Live servers on loopback for the server tests.

`live_url` serves the real bundled SmolLM2 (one engine for the whole session, small KV
cache and max_model_len so CPU runs stay fast). `fake_engine` keeps the Engine contract
without a model, for the paths that need control over steps: a full queue, a failing step.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from brim.runtime.engine.outputs import CompletionOutput, RequestOutput

MODEL = "SmolLM2-135M-Instruct"
# Small enough for 2 CPU cores; 160 blocks of 16 hold 64 short requests at once.
ENGINE_KWARGS = dict(max_model_len=256, num_gpu_blocks=160, max_num_seqs=64, block_size=16,
                     seed=0)


class LiveServer(str):
    """The base URL, carrying the app's ServerState as `.state`, uvicorn's as `.server`."""

    state = None
    server = None


@contextlib.contextmanager
def serve(engine, *, tokenizer=None, **settings) -> Iterator[LiveServer]:
    """Run build_app(engine) under `brim serve`'s uvicorn server (with its shutdown drain)
    in a thread on a free loopback port. `.server` is the uvicorn server."""
    import uvicorn

    from brim.runtime.cli.serve import Server
    from brim.runtime.server.app import ServerSettings, build_app

    settings.setdefault("served_model_names", [MODEL])
    settings.setdefault("shutdown_timeout", 2.0)  # tests that leave a stream open end fast
    app = build_app(engine, ServerSettings(**settings), tokenizer=tokenizer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        url = LiveServer(f"http://127.0.0.1:{port}")
        url.state = app.state.brim
        url.server = server
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="session")
def server_engine(bundled_model_dir):
    from brim.runtime.config import EngineConfig
    from brim.runtime.engine.engine import Engine

    return Engine(EngineConfig.create(bundled_model_dir, device="cpu", **ENGINE_KWARGS))


@pytest.fixture(scope="session")
def live_url(server_engine) -> Iterator[str]:
    with serve(server_engine) as url:
        yield url


@pytest.fixture(scope="session")
def live_url_tp3(tp3_engine) -> Iterator[str]:
    """The bundled model split over 3 tensor-parallel ranks (tests/runtime/conftest.py)."""
    with serve(tp3_engine) as url:
        yield url


@pytest.fixture(scope="session")
def offline_llm(bundled_model_dir):
    from brim.runtime import LLM

    return LLM(str(bundled_model_dir), device="cpu", **ENGINE_KWARGS)


@pytest.fixture(scope="session")
def tokenizer(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_model_dir))


@pytest.fixture
def fake_engine(bundled_model_dir, tokenizer):
    return FakeEngine(bundled_model_dir, tokenizer)


@pytest.fixture
def make_fake_engine(bundled_model_dir, tokenizer):
    """FakeEngine(**kwargs) for tests that need other limits."""
    return lambda **kwargs: FakeEngine(bundled_model_dir, tokenizer, **kwargs)


class FakeStats:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


class FakeEngine:
    """The Engine contract without a model: every step gives each request the token " a".

    gate: cleared, step() waits (at most 10 s) until a test sets it; requests stay waiting.
    poison: a prompt token id; a step with such a request raises, as a broken kernel would.
    bad_row: a prompt token id; the engine finishes such a request with an error and the
        others carry on, as the real engine does when a step fails on one request.
    request_limits: the work one request may ask for (the --max-n ... flags).
    step_delay: seconds each step takes, so that requests stay in flight a while.
    """

    def __init__(self, model_dir, tokenizer, num_gpu_blocks: int = 32,
                 request_limits=None) -> None:
        from brim.runtime.config import EngineConfig
        from brim.runtime.engine.admission import Limits, RequestLimits
        from brim.runtime.planner.report import MemoryReport

        config = EngineConfig.create(model_dir, device="cpu", **{
            **ENGINE_KWARGS, "num_gpu_blocks": num_gpu_blocks})
        self.model_path = config.model.path
        self.limits = Limits(config.model.max_model_len, config.model.facts.vocab_size,
                             request_limits or RequestLimits())
        self.memory_report = MemoryReport(
            device="cpu", gpu_memory_utilization=config.cache.gpu_memory_utilization,
            block_size=config.cache.block_size, kv_bytes_per_token=0, weights_bytes=0,
            num_gpu_blocks=num_gpu_blocks, max_model_len=config.model.max_model_len,
            requested_max_model_len=config.model.max_model_len)
        self.tokenizer = tokenizer
        self.num_gpu_blocks = num_gpu_blocks
        self.token = tokenizer.encode(" a")[0]
        self.gate = threading.Event()
        self.gate.set()
        self.poison: int | None = None
        self.bad_row: int | None = None
        self.step_delay = 0.0
        self.requests: dict[str, tuple[list[int], object, list[int], int]] = {}
        self.num_steps = 0
        self.num_generation_tokens = 0

    def add_request(self, req_id, prompt_token_ids, params, prompt=None, cache_salt=None) -> None:
        from brim.runtime.engine.admission import admit

        max_tokens = admit(prompt_token_ids, params, self.limits)  # as the engine does
        self.requests[req_id] = (list(prompt_token_ids), params, [], max_tokens)

    def abort(self, req_id) -> None:
        self.requests.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if not self.gate.wait(timeout=10):
            raise TimeoutError("the test never opened the gate")
        from brim.runtime.engine.engine import FailedRequestOutput

        if self.step_delay:
            time.sleep(self.step_delay)
        self.num_steps += 1
        if any(self.poison in prompt for prompt, _, _, _ in self.requests.values()):
            raise RuntimeError("poisoned batch")
        outputs = []
        for req_id, (prompt, params, generated, max_tokens) in list(self.requests.items()):
            if self.bad_row is not None and self.bad_row in prompt:
                del self.requests[req_id]
                outputs.append(FailedRequestOutput(req_id, None, prompt, [
                    CompletionOutput(i, "", [], "error") for i in range(params.n)], True,
                    error="IndexError('bad row')"))
                continue
            generated.append(self.token)
            self.num_generation_tokens += 1
            finished = len(generated) >= max_tokens
            text = self.tokenizer.decode(generated)
            outputs.append(RequestOutput(req_id, None, prompt, [
                CompletionOutput(i, text, list(generated), "length" if finished else None)
                for i in range(params.n)], finished))
            if finished:
                del self.requests[req_id]
        return outputs

    def get_stats(self) -> FakeStats:
        # Before a request's first step it is waiting; after, running with one block.
        waiting = sum(1 for _, _, g, _ in self.requests.values() if not g)
        running = len(self.requests) - waiting
        return FakeStats(num_running=running, num_waiting=waiting,
                         num_total_blocks=self.num_gpu_blocks,
                         num_free_blocks=self.num_gpu_blocks - running,
                         num_used_blocks=running, num_cached_blocks=0,
                         kv_cache_usage=running / self.num_gpu_blocks, num_preemptions=0,
                         num_prompt_tokens=0, num_generation_tokens=self.num_generation_tokens,
                         prefix_cache_queries=0, prefix_cache_hits=0)
