"""One client must never hurt the others.

A long stream and a non-streaming request run while bad requests of every family arrive:
each bad one gets its 400 (or, if the engine fails on it, its own error), and the two
others finish with exactly the tokens they produce without it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.runtime.server.conftest import MODEL, serve
from tests.runtime.server.test_errors import error_of

PROMPT = "The capital of France is"
LONG = {"model": MODEL, "prompt": "Tell me a long story about a lighthouse.", "max_tokens": 96,
        "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 2}
FULL = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of "
                                                                 "France?"}],
        "max_tokens": 48, "temperature": 0, "ignore_eos": True, "seed": 7}

# (path, body or raw bytes, the expected status, the param a 400 names)
BAD_REQUESTS = [
    # values that used to pass validation and then fail every request in the engine step
    ("/v1/completions", {"top_k": 2**63, "temperature": 1, "seed": 1}, 200, None),
    ("/v1/completions", {"stop_token_ids": [70000], "min_tokens": 2}, 400, "stop_token_ids"),
    ("/v1/completions", {"stop_token_ids": [-5]}, 400, "stop_token_ids"),
    ("/v1/completions", {"temperature": 1e300, "seed": 3}, 200, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ("/v1/completions", {"top_p": 1e-300, "temperature": 1}, 200, None),
    ("/v1/completions", {"seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"seed": -(2**63) - 1}, 400, "seed"),
    ("/v1/completions", {"seed": 2**63 - 1, "n": 2, "temperature": 1}, 200, None),
    ("/v1/completions", {"prompt": [70000, 1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1], "echo": True}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 2**70}, 400, "max_tokens"),
    ("/v1/completions", {"min_tokens": 2**63}, 400, "min_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 2**40}, 400, "max_completion_tokens"),
    # work one request may ask for
    ("/v1/completions", {"n": 10000}, 400, "n"),
    ("/v1/completions", {"prompt": [PROMPT] * 200}, 400, "prompt"),
    ("/v1/completions", {"logprobs": 100000}, 400, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50000}, 400, "top_logprobs"),
    ("/v1/completions", {"stop": ["x"] * 1000}, 400, "stop"),
    ("/v1/completions", {"stop": "y" * 100000}, 400, "stop"),
    ("/v1/completions", {"stop_token_ids": list(range(5000))}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"n": 100}, 400, "max_tokens"),  # 100 x what the context leaves
    # templates and bodies
    ("/v1/chat/completions", {"chat_template": "{% for i in range(99999) %}{% endfor %}"},
     400, "chat_template"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"tokenize": True}}, 400,
     "chat_template_kwargs.tokenize"),
    ("/v1/completions", {"prompt": "z" * (5 * 2**20)}, 413, None),
]


def bad_body(path: str, body: dict | bytes):
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"prompt": PROMPT} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "hi"}]})
    if "max_completion_tokens" in body or (path == "/v1/chat/completions" and "n" in body):
        del base["max_tokens"]
    return {"json": {**base, **body}}


async def long_stream(client: httpx.AsyncClient, started: asyncio.Event) -> dict:
    text, tokens, finish = "", [], None
    async with client.stream("POST", "/v1/completions", json=LONG) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text += choice["text"]
            tokens += (choice["logprobs"] or {}).get("tokens", [])
            finish = choice["finish_reason"] or finish
            started.set()
    return {"text": text, "tokens": tokens, "finish": finish}


async def full_request(client: httpx.AsyncClient) -> dict:
    response = await client.post("/v1/chat/completions", json=FULL)
    assert response.status_code == 200, response.text
    body = response.json()
    return {"text": body["choices"][0]["message"]["content"],
            "usage": body["usage"]["completion_tokens"]}


async def run(url: str, bad: list | None) -> tuple[dict, dict, list]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = asyncio.Event()
        stream = asyncio.create_task(long_stream(client, started))
        full = asyncio.create_task(full_request(client))
        answers = []
        if bad:
            await asyncio.wait_for(started.wait(), 60)  # both are in flight now
            for path, body, _, _ in bad:
                answers.append(await client.post(path, **bad_body(path, body)))
                assert not stream.done(), "the stream ended before the bad requests did"
        return await stream, await full, answers


@pytest.mark.slow
def test_bad_requests_hurt_no_one_else(live_url):
    alone_stream, alone_full, _ = asyncio.run(run(live_url, None))
    stream, full, answers = asyncio.run(run(live_url, BAD_REQUESTS))
    for (path, body, status, param), response in zip(BAD_REQUESTS, answers):
        shown = body if isinstance(body, bytes) else {k: str(v)[:40] for k, v in body.items()}
        assert response.status_code == status, (path, shown, response.text[:300])
        if status == 400:
            error = error_of(response, 400)
            assert error["param"] == param, (shown, error)
            assert error["type"] == "invalid_request_error"
    assert stream == alone_stream
    assert stream["finish"] == "length" and len(stream["tokens"]) == LONG["max_tokens"]
    assert full == alone_full
    assert live_url.state.engine.is_alive


def test_a_request_the_engine_fails_on_gets_its_own_error(fake_engine, tokenizer):
    """The engine finished one request with an error (a step failed on its row): that
    request gets a 500 (a stream, an error event and [DONE]); the others carry on."""
    bad_token = tokenizer.encode(" poison")[0]
    fake_engine.bad_row = bad_token
    fake_engine.step_delay = 0.01
    with serve(fake_engine, tokenizer=tokenizer) as url:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                good = asyncio.create_task(client.post("/v1/completions", json={
                    "prompt": "hello", "max_tokens": 30}))
                await asyncio.sleep(0.05)
                bad = await client.post("/v1/completions", json={
                    "prompt": [bad_token], "max_tokens": 30})
                async with client.stream("POST", "/v1/completions", json={
                        "prompt": [bad_token], "max_tokens": 30, "stream": True}) as response:
                    events = [line async for line in response.aiter_lines() if line]
                return await good, bad, events

        good, bad, events = asyncio.run(main())
    error = error_of(bad, 500)
    assert error["message"] == ("The request failed inside the engine: the engine failed on "
                                "this request: IndexError('bad row').")
    assert '"type":"server_error"' in events[0] and events[-1] == "data: [DONE]"
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == " a" * 30
