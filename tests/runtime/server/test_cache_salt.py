"""cache_salt over HTTP: requests share prefix-cache blocks only with the same salt.

The hit counter is read from /metrics, as an operator would, around real openai-client
requests against the live SmolLM2 server (prefix caching on, block size 16).
"""

from __future__ import annotations

import openai
import pytest

from tests.runtime.server.conftest import ENGINE_KWARGS, MODEL
from tests.runtime.server.test_metrics import scrape

pytestmark = pytest.mark.slow

BLOCK = ENGINE_KWARGS["block_size"]
# Text no other test sends, so no earlier request left its blocks in the cache.
PROMPT = ("Salted tenants keep their own cache. The lighthouse keeper counted ships each "
          "evening, noted their flags, and wrote the tally in a blue ledger that nobody "
          "else was allowed to read; on stormy nights the ledger stayed dry in a tin box.")


@pytest.fixture(scope="module")
def client(live_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def hits_of(client, live_url, salt: str | None, **kwargs) -> tuple[int, int, str]:
    """(prefix-cache hit tokens, prompt tokens, text) for one greedy completion."""
    before = scrape(live_url)["brim_prefix_cache_hits_total"]
    extra = {"cache_salt": salt} if salt is not None else {}
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                         temperature=0, extra_body=extra, **kwargs)
    after = scrape(live_url)["brim_prefix_cache_hits_total"]
    return int(after - before), response.usage.prompt_tokens, response.choices[0].text


def test_salts_isolate_and_same_salt_shares(client, live_url):
    hits, prompt_tokens, first = hits_of(client, live_url, "tenant-a")
    assert prompt_tokens >= 3 * BLOCK
    assert hits == 0
    # Same tokens, other salt or none: nothing of tenant-a's may be reused.
    for salt in ("tenant-b", None):
        hits, _, text = hits_of(client, live_url, salt)
        assert hits == 0, salt
        assert text == first
    # tenant-a again: every full block but the one holding the last prompt token is reused
    # (the last token is always computed to get logits).
    hits, _, text = hits_of(client, live_url, "tenant-a")
    assert hits % BLOCK == 0
    assert prompt_tokens - BLOCK <= hits < prompt_tokens
    assert text == first
    # The unsalted run cached its blocks too; a second unsalted request finds them.
    hits, _, _ = hits_of(client, live_url, None)
    assert prompt_tokens - BLOCK <= hits < prompt_tokens


def test_chat_carries_the_salt(client, live_url):
    messages = [{"role": "system", "content": PROMPT},
                {"role": "user", "content": "How many ships?"}]

    def chat_hits(salt):
        before = scrape(live_url)["brim_prefix_cache_hits_total"]
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                  temperature=0,
                                                  extra_body={"cache_salt": salt})
        return int(scrape(live_url)["brim_prefix_cache_hits_total"] - before), response

    hits, response = chat_hits("chat-tenant-1")
    assert hits == 0
    hits, _ = chat_hits("chat-tenant-2")
    assert hits == 0
    hits, _ = chat_hits("chat-tenant-1")
    assert hits >= response.usage.prompt_tokens - BLOCK
    assert hits % BLOCK == 0


def test_empty_salt_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  extra_body={"cache_salt": ""})
    assert "cache_salt" in str(info.value)
