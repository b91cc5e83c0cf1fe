"""Concurrent streams share engine steps; clients that leave free their KV blocks."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from brim.runtime.sampling_params import SamplingParams
from tests.runtime.server.conftest import MODEL
from tests.runtime.server.test_metrics import scrape

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Water boils at", "My favourite fruit is"]
MAX_TOKENS = 16


async def stream_one(client: httpx.AsyncClient, prompt: str, leave_after: int | None) -> dict:
    """Stream a completion; with leave_after, disconnect after that many text chunks."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, num_chunks, finish = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            num_chunks += 1
            if leave_after is not None and num_chunks >= leave_after:
                break  # leaving the block closes the connection mid-stream
    return {"prompt": prompt, "text": text, "finish": finish, "left": leave_after is not None}


def test_64_streams_with_a_quarter_disconnecting(live_url, offline_llm):
    expected = {
        prompt: out.outputs[0].text
        for prompt, out in zip(PROMPTS, offline_llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
            use_tqdm=False))
    }
    before = scrape(live_url)
    steps_before = live_url.state.engine.num_steps

    async def main():
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live_url, timeout=120, limits=limits) as client:
            jobs = [stream_one(client, PROMPTS[i % 4], 3 if i % 4 == 3 else None)
                    for i in range(64)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=240)

    results = asyncio.run(main())
    stayed = [r for r in results if not r["left"]]
    assert len(stayed) == 48
    for r in stayed:
        assert r["text"] == expected[r["prompt"]], r["prompt"]
        assert r["finish"] == "length"
    after = wait_for_idle(live_url)
    assert after["brim_kv_cache_blocks_used"] == 0
    assert after["brim_num_requests_running"] == 0
    assert after["brim_num_requests_waiting"] == 0
    assert after["brim_kv_cache_usage_ratio"] == 0
    grew = {k: after[k] - before[k] for k in after if k.startswith("brim_request_success")}
    assert grew['brim_request_success_total{finished_reason="abort"}'] == 16
    assert grew['brim_request_success_total{finished_reason="length"}'] == 48
    # The 48 full streams produced 16 tokens each; the 16 that left stopped early.
    generated = after["brim_generation_tokens_total"] - before["brim_generation_tokens_total"]
    assert 48 * 16 + 16 * 3 <= generated < 64 * 16
    # Continuous batching: 64 requests of 16 tokens took far fewer than 64 x 16 steps.
    assert live_url.state.engine.num_steps - steps_before < 200


def test_disconnect_frees_blocks_within_a_step(live_url):
    engine = live_url.state.engine
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{live_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert engine.stats.num_used_blocks > 0
        steps_at_close = engine.num_steps
    # Leaving the block closed the connection.
    deadline = time.monotonic() + 10
    while engine.stats.num_used_blocks or engine.stats.num_running:
        assert time.monotonic() < deadline, "blocks were not freed"
        time.sleep(0.005)
    assert engine.num_steps - steps_at_close <= 2


def wait_for_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(url)
        if values["brim_num_requests_running"] == 0 or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_non_streaming_client_leaving_aborts(live_url):
    before = scrape(live_url)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 250,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    after = wait_for_idle(live_url)
    assert after['brim_request_success_total{finished_reason="abort"}'] - before[
        'brim_request_success_total{finished_reason="abort"}'] == 1
    assert after["brim_kv_cache_blocks_used"] == 0
    generated = after["brim_generation_tokens_total"] - before["brim_generation_tokens_total"]
    assert 0 < generated < 250
