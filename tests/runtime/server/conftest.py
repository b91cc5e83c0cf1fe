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
    """The base URL, carrying the app's ServerState as `.state`."""

    state = None


@contextlib.contextmanager
def serve(engine, *, tokenizer=None, **settings) -> Iterator[LiveServer]:
    """Run build_app(engine) under uvicorn in a thread on a free loopback port."""
    import uvicorn

    from brim.runtime.server.app import ServerSettings, build_app

    settings.setdefault("served_model_names", [MODEL])
    app = build_app(engine, ServerSettings(**settings), tokenizer=tokenizer)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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


class FakeStats:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


class FakeEngine:
    """The Engine contract without a model: every step gives each request the token " a".

    gate: cleared, step() waits (at most 10 s) until a test sets it; requests stay waiting.
    poison: a prompt token id; a step with such a request raises, as a broken kernel would.
    """

    def __init__(self, model_dir, tokenizer, num_gpu_blocks: int = 32) -> None:
        from brim.runtime.config import EngineConfig
        from brim.runtime.engine.admission import Limits
        from brim.runtime.planner.report import MemoryReport

        config = EngineConfig.create(model_dir, device="cpu", **{
            **ENGINE_KWARGS, "num_gpu_blocks": num_gpu_blocks})
        self.model_path = config.model.path
        self.limits = Limits(config.model.max_model_len, config.model.facts.vocab_size)
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
        self.requests: dict[str, tuple[list[int], object, list[int]]] = {}
        self.num_steps = 0
        self.num_generation_tokens = 0

    def add_request(self, req_id, prompt_token_ids, params, prompt=None, cache_salt=None) -> None:
        self.requests[req_id] = (list(prompt_token_ids), params, [])

    def abort(self, req_id) -> None:
        self.requests.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if not self.gate.wait(timeout=10):
            raise TimeoutError("the test never opened the gate")
        self.num_steps += 1
        if any(self.poison in prompt for prompt, _, _ in self.requests.values()):
            raise RuntimeError("poisoned batch")
        outputs = []
        for req_id, (prompt, params, generated) in list(self.requests.items()):
            generated.append(self.token)
            self.num_generation_tokens += 1
            finished = len(generated) >= params.max_tokens
            text = self.tokenizer.decode(generated)
            outputs.append(RequestOutput(req_id, None, prompt, [
                CompletionOutput(i, text, list(generated), "length" if finished else None)
                for i in range(params.n)], finished))
            if finished:
                del self.requests[req_id]
        return outputs

    def get_stats(self) -> FakeStats:
        # Before a request's first step it is waiting; after, running with one block.
        waiting = sum(1 for _, _, g in self.requests.values() if not g)
        running = len(self.requests) - waiting
        return FakeStats(num_running=running, num_waiting=waiting,
                         num_total_blocks=self.num_gpu_blocks,
                         num_free_blocks=self.num_gpu_blocks - running,
                         num_used_blocks=running, num_cached_blocks=0,
                         kv_cache_usage=running / self.num_gpu_blocks, num_preemptions=0,
                         num_prompt_tokens=0, num_generation_tokens=self.num_generation_tokens,
                         prefix_cache_queries=0, prefix_cache_hits=0)
