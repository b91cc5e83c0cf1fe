"""Bounded work per request (each limit a flag), bodies and content types.

Against the fake engine, which applies the engine's own admission rules.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import httpx
import psutil
import pytest

from brim.runtime.engine.admission import RequestLimits
from tests.runtime.server.conftest import MODEL, serve
from tests.runtime.server.test_errors import error_of

PROMPT = "The capital of France is"
LIMITS = RequestLimits(max_n=4, max_logprobs=3, max_stop_strings=2, max_stop_string_len=8,
                       max_stop_token_ids=2, max_request_generation_tokens=100)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def limited_url(make_fake_engine, tokenizer):
    with serve(make_fake_engine(request_limits=LIMITS), tokenizer=tokenizer) as url:
        yield url


@pytest.mark.parametrize(("path", "body", "param", "flag", "limit"), [
    ("/v1/completions", {"n": 5}, "n", "--max-n", "4 completions per request"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "n", "--max-n", "4 completions"),
    ("/v1/completions", {"prompt": ["a"] * 5}, "prompt", "--max-n", "4 completions"),
    ("/v1/chat/completions", {"n": 5}, "n", "--max-n", "4 completions"),
    ("/v1/completions", {"logprobs": 4}, "logprobs", "--max-logprobs", "3 alternatives"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 4}, "top_logprobs",
     "--max-logprobs", "3 alternatives"),
    ("/v1/completions", {"stop": ["a", "b", "c"]}, "stop", "--max-stop-strings", "2 stop"),
    ("/v1/completions", {"stop": "x" * 9}, "stop", "--max-stop-string-len", "8 characters"),
    ("/v1/completions", {"stop_token_ids": [1, 2, 3]}, "stop_token_ids",
     "--max-stop-token-ids", "2 stop token ids"),
    ("/v1/completions", {"n": 4, "max_tokens": 26}, "max_tokens",
     "--max-request-generation-tokens", "100 generated tokens per request"),
    ("/v1/chat/completions", {"n": 2, "max_completion_tokens": 51}, "max_completion_tokens",
     "--max-request-generation-tokens", "100 generated tokens"),
    # Unset, max_tokens is what the context leaves (about 240 here).
    ("/v1/chat/completions", {}, "max_tokens", "--max-request-generation-tokens", "100"),
])
def test_each_limit_is_refused_above_its_flag(limited_url, path, body, param, flag, limit):
    base = {"model": MODEL, "max_tokens": 4}
    base.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT})
    if "max_completion_tokens" in body or path == "/v1/chat/completions" and not body:
        del base["max_tokens"]
    error = error_of(httpx.post(f"{limited_url}{path}", json={**base, **body}), 400)
    assert error["param"] == param
    assert error["message"].startswith(f"Invalid value for '{param}': ")
    assert f"({flag})" in error["message"] and limit in error["message"]


def test_at_the_limits_requests_are_served(limited_url):
    response = httpx.post(f"{limited_url}/v1/completions", json={
        "prompt": [PROMPT, PROMPT], "n": 2, "max_tokens": 25, "logprobs": None,
        "stop": ["ab", "x" * 8], "stop_token_ids": [1, 2]})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 4
    response = httpx.post(f"{limited_url}/v1/chat/completions", json={
        "messages": CHAT, "max_completion_tokens": 50, "n": 2})
    assert response.status_code == 200, response.text


def test_the_flags_set_the_engine_limits():
    from brim.runtime.cli.serve import register, request_limits

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    defaults = request_limits(parser.parse_args(["serve"]))
    assert defaults == RequestLimits()
    assert (defaults.max_n, defaults.max_logprobs, defaults.max_stop_strings,
            defaults.max_stop_string_len, defaults.max_stop_token_ids,
            defaults.max_request_generation_tokens) == (128, 20, 16, 256, 64, None)
    args = parser.parse_args(["serve", "--max-n", "4", "--max-logprobs", "3",
                              "--max-stop-strings", "2", "--max-stop-string-len", "8",
                              "--max-stop-token-ids", "2",
                              "--max-request-generation-tokens", "100"])
    assert request_limits(args) == LIMITS


# -- max_tokens: null ------------------------------------------------------------------------


def test_null_max_tokens_means_the_documented_default(fake_engine, tokenizer):
    """Completions: null is OpenAI's default, 16 (as when left out). Chat: null (or unset)
    is what max_model_len leaves after the prompt. docs/server.md says both."""
    with serve(fake_engine, tokenizer=tokenizer) as url:
        for body in ({"prompt": PROMPT}, {"prompt": PROMPT, "max_tokens": None}):
            usage = httpx.post(f"{url}/v1/completions", json=body).json()["usage"]
            assert usage["completion_tokens"] == 16, body
        usage = httpx.post(f"{url}/v1/chat/completions",
                           json={"messages": CHAT, "max_tokens": None}, timeout=30).json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 256  # max_model_len


# -- bodies --------------------------------------------------------------------------------


def test_json_endpoints_require_a_json_content_type(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer) as url:
        body = b'{"prompt": "hi", "max_tokens": 1}'
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
                error = error_of(httpx.post(f"{url}{path}", content=body, headers=headers), 415)
                assert error["code"] == "unsupported_media_type"
                assert error["message"].startswith("This endpoint takes a JSON body: send "
                                                   "'Content-Type: application/json'")
        ok = httpx.post(f"{url}/v1/completions", content=body,
                        headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


def test_a_chunked_body_is_refused_as_it_arrives(fake_engine, tokenizer):
    """256 MiB without Content-Length: 413 once the limit is passed, and the server's memory
    grows by about the limit, not by the body (it used to read the whole body first)."""
    limit = 1 << 20
    with serve(fake_engine, tokenizer=tokenizer, max_request_body_bytes=limit) as url:
        process = psutil.Process()
        chunk = b"x" * (1 << 20)
        baseline = process.memory_info().rss
        peak, sampling = [baseline], threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            response = httpx.post(f"{url}/v1/completions", content=(chunk for _ in range(256)),
                                  headers={"content-type": "application/json"}, timeout=60)
        finally:
            sampling.set()
            sampler.join()
        error = error_of(response, 413)
        assert error["message"] == (
            "The request body is more than this server's limit of 1048576 bytes "
            "(--max-request-body-bytes). Send a smaller request, or raise the limit.")
        # The client's own chunks and the allocator's slack are in the same process.
        assert peak[0] - baseline < limit + 24 * 2**20, (peak[0] - baseline) / 2**20
        # The connection is still usable and the server healthy.
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_unread(fake_engine, tokenizer):
    limit = 1 << 20
    with serve(fake_engine, tokenizer=tokenizer, max_request_body_bytes=limit) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
            reply = b""
            while not reply.endswith(b"}}"):  # the headers, then the JSON error
                data = sock.recv(4096)
                assert data, reply
                reply += data
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413 ")
        assert "The request body is 999999999 bytes, more than this server's limit" in reply
