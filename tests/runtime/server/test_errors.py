"""Every error path: OpenAI's JSON shape, the right status, a message with the numbers."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.runtime.server.conftest import MODEL, serve

PROMPT = "The capital of France is"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# -- against the real model ---------------------------------------------------------------

live = pytest.mark.slow


@live
def test_context_length_states_the_budget(live_url):
    prompt_ids = [1000 + i for i in range(100)]
    response = httpx.post(f"{live_url}/v1/completions",
                          json={"model": MODEL, "prompt": prompt_ids, "max_tokens": 200})
    error = error_of(response, 400)
    assert error["message"] == (
        "Given your max_tokens=200 request and max_model_len=256, only 56 tokens are available "
        "for the prompt, and your prompt has 100 tokens. Shorten the prompt by 44 tokens or "
        "lower max_tokens to 156.")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "max_tokens"
    assert error["code"] == "context_length_exceeded"


@live
def test_prompt_alone_too_long_gets_its_own_message(live_url):
    response = httpx.post(f"{live_url}/v1/completions",
                          json={"model": MODEL, "prompt": [1000] * 300, "max_tokens": 5})
    error = error_of(response, 400)
    assert error["message"] == (
        "This model's maximum context length is 256 tokens, and your prompt has 300 tokens, "
        "which leaves no room for output. Shorten the prompt to at most 255 tokens.")
    assert error["param"] == "prompt"
    assert error["code"] == "context_length_exceeded"


@live
def test_max_tokens_alone_filling_the_context(live_url):
    response = httpx.post(f"{live_url}/v1/completions",
                          json={"model": MODEL, "prompt": [1000] * 10, "max_tokens": 300})
    error = error_of(response, 400)
    assert error["message"] == (
        "Your max_tokens=300 request alone fills max_model_len=256 (prompt plus output), "
        "leaving no room for your prompt of 10 tokens. Lower max_tokens to 246 or less.")
    assert error["param"] == "max_tokens"


@live
def test_chat_context_length_without_max_tokens(live_url):
    messages = [{"role": "user", "content": "hello " * 300}]
    error = error_of(httpx.post(f"{live_url}/v1/chat/completions",
                                json={"model": MODEL, "messages": messages}), 400)
    assert error["param"] == "messages"
    assert error["message"].startswith("This model's maximum context length is 256 tokens, and "
                                       "your prompt has ")


@live
def test_context_length_through_the_openai_client(live_url):
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_completion_tokens=250,
                                       messages=[{"role": "user", "content": "hi " * 20}])
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "max_completion_tokens"
    # Named as the client named it, in the message too.
    assert "Given your max_completion_tokens=250 request and max_model_len=256, only 6 " \
        "tokens" in str(info.value)
    assert "or lower max_completion_tokens to " in str(info.value)


@live
@pytest.mark.parametrize(("body", "param", "message"), [
    ({"temperature": -1}, "temperature", "Invalid value for 'temperature': must be >= 0, got "
                                         "-1."),
    ({"top_p": 2.0}, "top_p", "Invalid value for 'top_p': must be in (0, 1], got 2.0."),
    ({"n": 0}, "n", "Invalid value for 'n': must be >= 1, got 0."),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens", "Invalid value for 'min_tokens': must be "
                                                       "<= max_tokens (3), got 5."),
    ({"max_tokens": 0}, "max_tokens", "Invalid value for 'max_tokens': must be >= 1, got 0."),
    ({"logprobs": 50}, "logprobs", "Invalid value for 'logprobs': logprobs=50 is more than this "
                                   "server's limit of 20 alternatives per token "
                                   "(--max-logprobs). Ask for at most 20."),
    ({"temperature": "hot"}, "temperature", "Invalid value for 'temperature': Input should be a "
                                            "valid number (got 'hot')."),
    ({"n": True}, "n", "Invalid value for 'n': Input should be a valid integer (got True)."),
    ({"seed": 2**64}, "seed", "Invalid value for 'seed': must be in [-9223372036854775808, "
                              "9223372036854775807], got 18446744073709551616."),
    ({"top_k": 2**63, "stop_token_ids": [70000]}, "stop_token_ids",
     "Invalid value for 'stop_token_ids': must be token ids in [0, 49152) (this model's "
     "vocabulary), got [70000]."),
    ({"n": 10000}, "n", "Invalid value for 'n': n=10000 is more than this server's limit of 128 "
                        "completions per request (--max-n). Ask for fewer completions, or start "
                        "the server with a higher --max-n."),
    ({"prompt": []}, "prompt", "The prompt is empty: give a string, a list of strings, or token "
                               "ids."),
    ({"prompt": [70000]}, "prompt", "Prompt token ids must be in [0, 49152) for this model's "
                                    "vocabulary; got [70000]."),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported by brim "
                                                    "yet; remove it or set it to 0 (got 0.5)."),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed with stream=true."),
])
def test_invalid_parameters_name_the_parameter(live_url, body, param, message):
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body}
    error = error_of(httpx.post(f"{live_url}/v1/completions", json=request), 400)
    assert error["param"] == param
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


@live
def test_malformed_bodies(live_url):
    error = error_of(httpx.post(f"{live_url}/v1/chat/completions", content=b"{not json",
                                headers={"content-type": "application/json"}), 400)
    assert error["message"].startswith("The request body is not valid JSON")
    error = error_of(httpx.post(f"{live_url}/v1/chat/completions", json={"model": MODEL}), 400)
    assert (error["param"], error["message"]) == ("messages", "Missing required parameter: "
                                                              "'messages'.")
    error = error_of(httpx.post(f"{live_url}/v1/chat/completions", json={
        "messages": [{"role": "robot", "content": "hi"}]}), 400)
    assert error["param"] == "messages.0.role"
    error = error_of(httpx.post(f"{live_url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400)
    assert (error["param"], error["message"]) == ("top_logprobs",
                                                  "top_logprobs needs logprobs=true.")


@live
def test_unknown_model_is_404(live_url):
    response = httpx.post(f"{live_url}/v1/completions",
                          json={"model": "gpt-4", "prompt": PROMPT, "max_tokens": 2})
    error = error_of(response, 404)
    assert error["message"] == ("The model `gpt-4` does not exist. This server serves: "
                                f"{MODEL}.")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "model", "model_not_found")
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "a"}])


@live
def test_unknown_route_is_404_in_openai_shape(live_url):
    error = error_of(httpx.get(f"{live_url}/v1/engines"), 404)
    assert error["message"] == "No route GET /v1/engines; see /docs for the endpoints."


@live
def test_oversized_body_is_413(live_url):
    body = {"model": MODEL, "prompt": "x" * (5 * 2**20), "max_tokens": 2}
    error = error_of(httpx.post(f"{live_url}/v1/completions", json=body), 413)
    assert error["message"].startswith("The request body is 524")
    assert error["message"].endswith("bytes, more than this server's limit of 4194304 bytes "
                                     "(--max-request-body-bytes). Send a smaller request, or "
                                     "raise the limit.")
    assert error["code"] == "request_too_large"


@live
def test_oversized_chunked_body_is_413(live_url):
    def chunks():
        for _ in range(5):
            yield b"x" * 2**20

    response = httpx.post(f"{live_url}/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    error = error_of(response, 413)
    assert "more than this server's limit of 4194304 bytes" in error["message"]


# -- against the fake engine (control over steps) -----------------------------------------


def test_api_key_required_except_health_and_metrics(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer, api_key="s3cret") as url:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(httpx.post(f"{url}/v1/completions", json=body, headers=headers), 401)
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"
            assert error["message"].startswith("Missing or wrong API key")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json=body,
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == " a a"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_full_queue_is_503(fake_engine, tokenizer):
    fake_engine.gate.clear()  # steps wait: every request stays waiting
    with serve(fake_engine, tokenizer=tokenizer, max_queue_len=2) as url:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
        results = {}

        def send(name):
            results[name] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

        first = threading.Thread(target=send, args=("first",))
        first.start()
        wait_until(lambda: fake_engine.requests, "the first request to reach the engine")
        second = threading.Thread(target=send, args=("second",))
        second.start()
        wait_until(lambda: url.state.engine.num_waiting == 2, "the second request to queue")
        error = error_of(httpx.post(f"{url}/v1/completions", json=body), 503)
        assert error["message"] == ("The server is busy: 2 requests are waiting, the limit is 2 "
                                    "(--max-queue-len). Retry later, or raise --max-queue-len.")
        assert (error["type"], error["code"]) == ("service_unavailable_error", "queue_full")
        fake_engine.gate.set()
        first.join(30)
        second.join(30)
        assert results["first"].status_code == results["second"].status_code == 200
        # The queue drained: new requests are accepted again.
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_failing_step_fails_its_requests_not_the_server(fake_engine, tokenizer):
    poison = tokenizer.encode(" poison")[0]
    fake_engine.poison = poison
    with serve(fake_engine, tokenizer=tokenizer) as url:
        error = error_of(httpx.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": [poison], "max_tokens": 2}), 500)
        assert error["message"].startswith("The request failed inside the engine: the engine "
                                           "failed during a step: RuntimeError('poisoned batch')")
        assert error["type"] == "server_error"
        # Streaming: the error arrives as an event, then [DONE].
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": MODEL, "prompt": [poison], "max_tokens": 2, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert '"type":"server_error"' in events[0] and events[-1] == "data: [DONE]"
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                       "max_tokens": 3})
        assert ok.json()["choices"][0]["text"] == " a a a"


def test_health_is_503_when_the_loop_is_dead(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        app_loop_task = url.state.engine._task
        app_loop_task.get_loop().call_soon_threadsafe(app_loop_task.cancel)
        wait_until(app_loop_task.done, "the loop task to end")
        error = error_of(httpx.get(f"{url}/health"), 503)
        assert error["message"] == "The engine loop is not running."
        error = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT}), 503)
        assert error["message"] == ("The engine is not available: the engine loop is not "
                                    "running.")


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
