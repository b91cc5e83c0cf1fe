"""The official `openai` client against a live server with the bundled SmolLM2, on one
process and split over 3 tensor-parallel ranks (the same tests, against the same TP=1
offline reference)."""

from __future__ import annotations

import httpx
import openai
import pytest

from brim.runtime.sampling_params import SamplingParams
from tests.runtime.conftest import TP3_ENGINE_KWARGS
from tests.runtime.server.conftest import ENGINE_KWARGS, MODEL

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def url(request) -> str:
    """The server at tensor_parallel_size 1, then 3 (module scope: one at a time)."""
    return request.getfixturevalue("live_url" if request.param == 1 else "live_url_tp3")


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_completion_greedy_equals_offline_llm(client, offline_llm):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    offline = offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12),
                                   use_tqdm=False)[0].outputs[0]
    choice = response.choices[0]
    assert choice.text == offline.text
    assert "Paris" in choice.text
    assert response.object == "text_completion"
    assert response.model == MODEL
    assert response.id.startswith("cmpl-")
    assert choice.index == 0
    assert choice.finish_reason == offline.finish_reason
    assert response.usage.prompt_tokens == len(offline_llm.get_tokenizer().encode(PROMPT))
    assert response.usage.completion_tokens == len(offline.token_ids)
    assert response.usage.total_tokens == (response.usage.prompt_tokens
                                           + response.usage.completion_tokens)


def test_chat_greedy_equals_offline_llm(client, offline_llm):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                              temperature=0)
    offline = offline_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16),
                               use_tqdm=False)[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == offline.outputs[0].text
    assert "Paris" in choice.message.content
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_completion_stream_matches_non_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len([c for c in chunks if c.choices]) > 3  # really streamed, token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_matches_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage, no usage


def test_stream_ends_with_done(url):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_n_2_seeded_is_reproducible(client):
    def sample():
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.0, n=2, seed=1234)

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == second.usage.completion_tokens <= 24
    other = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                      temperature=1.0, n=2, seed=99)
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_n_2_chat_stream_gives_both_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                 temperature=0.8, n=2, seed=7, stream=True))
    indexes = {c.choices[0].index for c in chunks}
    assert indexes == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_string_ends_and_is_cut(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert "." in text
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=["."])
    choice = stopped.choices[0]
    assert choice.text == text[: text.index(".")]
    assert choice.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                         temperature=0, stop=["."], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                         temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == response.usage.completion_tokens == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert len(top) == 3
        assert logprob <= 0
        # greedy: the chosen token is the most likely one
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_chat_logprobs_stream_and_not(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=2)
    response = client.chat.completions.create(**kwargs)
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
               for entry in content)
    assert content[0].bytes == list(content[0].token.encode())
    streamed = [entry for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_extras_ignore_eos_min_tokens_top_k(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=20,
        temperature=0.7, seed=3,
        extra_body={"ignore_eos": True, "min_tokens": 20, "top_k": 5, "min_p": 0.05})
    assert response.usage.completion_tokens == 20
    assert response.choices[0].finish_reason == "length"


def test_stop_token_ids_end_generation(client, offline_llm):
    greedy = offline_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8),
                                  use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[2]
    assert stop_id not in greedy.token_ids[:2]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.stop_reason == stop_id
    assert stopped.usage.completion_tokens == 3  # the stop token counts, its text is not shown
    tokenizer = offline_llm.get_tokenizer()
    assert choice.text == tokenizer.decode(greedy.token_ids[:2])


def test_multiple_prompts_and_token_ids(client, offline_llm):
    ids = offline_llm.get_tokenizer().encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=6,
                                         temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: both the same
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == response.choices[0].text
    assert response.usage.prompt_tokens == len(ids) + len(
        offline_llm.get_tokenizer().encode("1, 2, 3,"))


def test_models_health_version_tokenize(url, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    expected = (ENGINE_KWARGS if url.state.engine.engine.workers is None
                else TP3_ENGINE_KWARGS)["max_model_len"]
    assert card["max_model_len"] == expected
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == 5
    assert tokenized["max_model_len"] == expected
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert text == {"prompt": PROMPT}
    chat = httpx.post(f"{url}/tokenize", json={"messages": QUESTION}).json()
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert chat["count"] == full.usage.prompt_tokens


def test_model_may_be_omitted(url):
    response = httpx.post(f"{url}/v1/completions",
                          json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert response.status_code == 200
    assert response.json()["model"] == MODEL
