"""Request-supplied chat templates: refused unless trusted; when trusted, rendered in a
separate process with a time budget, never stalling the event loop.

Against the fake engine with the bundled model's tokenizer (real templates, no model).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

from tests.runtime.server.conftest import MODEL, serve
from tests.runtime.server.test_errors import error_of

MESSAGES = [{"role": "user", "content": "hi there"}]
PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
# Nested loops: 10^10 iterations, hours of CPU if nothing stops it.
HEAVY = ("{% for i in range(100000) %}{% for j in range(100000) %}{% if i == j == -1 %}x"
         "{% endif %}{% endfor %}{% endfor %}")
BUDGET = 1.5


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **body})


def test_a_request_template_is_refused_unless_trusted(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer) as url:
        for body in ({"chat_template": PLAIN},
                     {"chat_template_kwargs": {"chat_template": PLAIN}}):
            error = error_of(chat(url, **body), 400)
            assert error["param"] == "chat_template"
            assert error["message"] == (
                "This server does not accept chat templates in requests: it renders the "
                "model's own. Remove chat_template, or start the server with "
                "--trust-request-chat-template.")
        tokenized = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES,
                                                        "chat_template": PLAIN})
        assert error_of(tokenized, 400)["param"] == "chat_template"
        # The model's own template still serves, with template variables passed through.
        assert chat(url, chat_template_kwargs={"custom_variable": 1}).status_code == 200
        error = error_of(chat(url, chat_template_kwargs={"tokenize": True}), 400)
        assert error["param"] == "chat_template_kwargs.tokenize"


@pytest.fixture
def trusted_url(fake_engine, tokenizer):
    with serve(fake_engine, tokenizer=tokenizer, trust_request_chat_template=True,
               chat_template_timeout=BUDGET) as url:
        yield url


def test_a_trusted_template_renders_the_prompt(trusted_url, tokenizer):
    tokenized = httpx.post(f"{trusted_url}/tokenize", json={"messages": MESSAGES,
                                                            "chat_template": PLAIN}).json()
    assert tokenized["tokens"] == tokenizer.encode("<user>hi there", add_special_tokens=False)
    response = chat(trusted_url, chat_template=PLAIN)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == tokenized["count"]
    # Template variables reach it, the tokenizer's special tokens too, as transformers'.
    tokenized = httpx.post(f"{trusted_url}/tokenize", json={
        "messages": MESSAGES, "chat_template": "{{ greeting }}{{ eos_token }}",
        "chat_template_kwargs": {"greeting": "hello"}}).json()
    assert tokenized["tokens"] == tokenizer.encode(f"hello{tokenizer.eos_token}",
                                                   add_special_tokens=False)


@pytest.mark.parametrize(("template", "start"), [
    ("{% for m in messages %}{{ m.content }", "The request's chat template failed: "
                                             "TemplateSyntaxError: "),
    ("{{ raise_exception('no system messages here') }}",
     "The request's chat template failed: TemplateError: no system messages here"),
    ("{{ 'x' * 10000000000 }}", "The request's chat template failed: MemoryError"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
     "The request's chat template failed: ValueError: the rendered prompt is longer than "),
])
def test_template_errors_are_400s_that_do_not_echo_it(trusted_url, template, start):
    error = error_of(chat(trusted_url, chat_template=template), 400)
    assert error["param"] == "chat_template"
    assert error["message"].startswith(start), error["message"]
    assert template not in error["message"] and "{{" not in error["message"]


def test_a_heavy_template_is_stopped_at_its_budget_without_stalling_others(trusted_url):
    worker = trusted_url.state.prompts._template_worker

    async def main():
        async with httpx.AsyncClient(base_url=trusted_url, timeout=30) as client:
            # The worker finished its imports: the heavy request is all template time.
            await client.post("/tokenize", json={"messages": MESSAGES, "chat_template": PLAIN})
            heavy_pid = worker._process.pid
            started = time.monotonic()
            heavy = asyncio.create_task(client.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 2, "chat_template": HEAVY}))
            await asyncio.sleep(0.2)  # it is rendering now
            latencies = []
            while not heavy.done():
                t = time.monotonic()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.monotonic() - t)
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            t = time.monotonic()
            other = await client.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                                    "max_tokens": 2})
            return heavy.result(), elapsed, latencies, other, time.monotonic() - t, heavy_pid

    heavy, elapsed, latencies, other, other_seconds, heavy_pid = asyncio.run(main())
    error = error_of(heavy, 400)
    assert (error["param"], error["code"]) == ("chat_template", "timeout")
    assert error["message"] == ("The chat template took longer than this server's budget of "
                                "1.5 s to render (--chat-template-timeout) and was stopped. "
                                "Simplify the template.")
    assert BUDGET <= elapsed < BUDGET + 1.5
    assert len(latencies) >= 10 and max(latencies) < 0.25, latencies
    assert other.status_code == 200 and other_seconds < 1.0
    # The runaway process is gone (no core left burning); a fresh one serves the next.
    assert not psutil.pid_exists(heavy_pid) or \
        psutil.Process(heavy_pid).status() == psutil.STATUS_ZOMBIE
    assert chat(trusted_url, chat_template=PLAIN).status_code == 200


def test_a_concurrent_request_is_not_delayed_by_a_heavy_template(trusted_url):
    async def main():
        async with httpx.AsyncClient(base_url=trusted_url, timeout=30) as client:
            await client.post("/tokenize", json={"messages": MESSAGES, "chat_template": PLAIN})
            heavy = asyncio.create_task(client.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 2, "chat_template": HEAVY}))
            await asyncio.sleep(0.2)
            t = time.monotonic()
            completion = await client.post("/v1/completions", json={"prompt": "hello " * 200,
                                                                    "max_tokens": 3})
            seconds = time.monotonic() - t
            return await heavy, completion, seconds

    heavy, completion, seconds = asyncio.run(main())
    assert heavy.status_code == 400
    assert completion.status_code == 200 and seconds < 1.0
