"""Request schemas and error formatting, without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from brim.runtime.engine.errors import PromptTooLongError
from brim.runtime.sampling_params import SamplingParams
from brim.runtime.server import protocol as p
from brim.runtime.server.errors import APIError, from_validation_error, invalid_request


def test_error_shape_and_statuses():
    body = APIError(400, "bad", param="top_p").to_dict()
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "top_p", "code": None}}
    assert APIError(401, "x").type == "authentication_error"
    assert APIError(503, "x").type == "service_unavailable_error"
    assert APIError(500, "x").type == "server_error"
    assert APIError(401, "x").to_response().headers["www-authenticate"] == "Bearer"


def test_issue_budget_message():
    error = invalid_request(PromptTooLongError(4500, 27000, 31096), prompt_param="messages")
    assert error.message.startswith(
        "Given your max_tokens=27000 request and max_model_len=31096, only 4096 tokens are "
        "available for the prompt, and your prompt has 4500 tokens.")
    assert (error.status_code, error.param, error.code) == (400, "max_tokens",
                                                            "context_length_exceeded")
    alone = invalid_request(PromptTooLongError(40000, 10, 31096), prompt_param="messages")
    assert alone.param == "messages"
    assert alone.message.startswith("This model's maximum context length is 31096 tokens")


def test_context_length_names_max_tokens_as_the_client_did():
    error = invalid_request(PromptTooLongError(4500, 27000, 31096),
                            {"max_tokens": "max_completion_tokens"}, "messages")
    assert error.param == "max_completion_tokens"
    assert error.message == (
        "Given your max_completion_tokens=27000 request and max_model_len=31096, only 4096 "
        "tokens are available for the prompt, and your prompt has 4500 tokens. Shorten the "
        "prompt by 404 tokens or lower max_completion_tokens to 26596.")
    fills = invalid_request(PromptTooLongError(10, 40000, 31096),
                            {"max_tokens": "max_completion_tokens"}, "messages")
    assert fills.message == (
        "Your max_completion_tokens=40000 request alone fills max_model_len=31096 (prompt plus "
        "output), leaving no room for your prompt of 10 tokens. Lower max_completion_tokens "
        "to 31086 or less.")


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 3}]})
    error = from_validation_error(info.value)
    assert error.status_code == 400
    assert error.param.startswith("messages.0.content")
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate({"messages": []})
    assert from_validation_error(info.value).param == "messages"


def sampling_error(**params):
    with pytest.raises(ValueError) as info:
        SamplingParams(**params)
    return invalid_request(info.value, {"logprobs": "top_logprobs"})


def test_sampling_errors_name_their_param_and_range():
    error = sampling_error(stop=["a", ""])
    assert (error.param, error.message) == ("stop", "Invalid value for 'stop': stop strings "
                                                    "must be non-empty.")
    error = sampling_error(top_k=-5)
    assert error.param == "top_k"
    assert error.message == ("Invalid value for 'top_k': must be 0 or -1 (disabled), or a "
                             "positive integer, got -5.")
    error = sampling_error(logprobs=-1)  # the chat API calls it top_logprobs
    assert (error.param, error.message) == ("top_logprobs", "Invalid value for 'top_logprobs': "
                                                            "must be >= 0, got -1.")
    assert invalid_request(ValueError("something else")).param is None


def test_out_of_range_fields_state_the_whole_declared_range():
    for body, param, message in [
        ({"top_p": 2.0}, "top_p", "Invalid value for 'top_p': must be in (0, 1], got 2.0."),
        ({"top_p": 0}, "top_p", "Invalid value for 'top_p': must be in (0, 1], got 0."),
        ({"seed": 2**64}, "seed", "Invalid value for 'seed': must be in [-9223372036854775808, "
                                  "9223372036854775807], got 18446744073709551616."),
        ({"n": 0}, "n", "Invalid value for 'n': must be >= 1, got 0."),
        ({"top_k": -2}, "top_k", "Invalid value for 'top_k': must be >= -1, got -2."),
    ]:
        with pytest.raises(ValidationError) as info:
            p.CompletionRequest.model_validate({"prompt": "x", **body})
        error = from_validation_error(info.value, p.CompletionRequest)
        assert (error.param, error.message) == (param, message)


def test_prompt_forms_parse():
    assert p.CompletionRequest(prompt="hi").prompt == "hi"
    assert p.CompletionRequest(prompt=[1, 2]).prompt == [1, 2]
    assert p.CompletionRequest(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]
    assert p.CompletionRequest(prompt=["a", "b"]).prompt == ["a", "b"]
    assert p.CompletionRequest(prompt="x").max_tokens == 16  # OpenAI's default
    assert p.DEFAULT_COMPLETION_MAX_TOKENS == 16  # also what null means (app.completions)
    assert p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).max_tokens is None


def test_unsupported_fields_are_named():
    assert p.CompletionRequest(prompt="x", suffix="y").unsupported()[0] == "suffix"
    assert p.CompletionRequest(prompt="x", best_of=3).unsupported()[0] == "best_of"
    assert p.CompletionRequest(prompt="x", best_of=1).unsupported() is None
    assert p.CompletionRequest(prompt="x", logit_bias={"1": 2}).unsupported()[0] == "logit_bias"
    image = p.ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert image.unsupported()[0] == "messages"
    text = p.ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert text.unsupported() is None and text.messages[0].text() == "ab"


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_chunks_built_as_dicts_equal_the_pydantic_models_dump(include_usage):
    """The per-token SSE chunks skip pydantic (serving._choice, _choice_chunk); their JSON must
    be byte for byte what protocol's models give: the models are the reference."""
    from brim.runtime.server import serving

    completion_logprobs = p.CompletionLogprobs(
        tokens=[" a", "é"], token_logprobs=[-0.5, None], top_logprobs=[{" a": -0.5}, None],
        text_offset=[0, 2]).model_dump()
    chat_logprobs = p.ChatLogprobs(content=[p.ChatTokenLogprob(
        token="x", logprob=-1.25, bytes=[120],
        top_logprobs=[p.TopLogprob(token="x", logprob=-1.25, bytes=[120])])]).model_dump()
    cases = {
        "completion": [
            serving._choice(0, text=" hello"),
            serving._choice(3, text="", finish_reason="stop", stop_reason="###"),
            serving._choice(1, text="é\n", logprobs=completion_logprobs, finish_reason="length"),
            serving._choice(2, text="x", finish_reason="stop", stop_reason=7),
        ],
        "chat": [
            serving._choice(0, delta={"role": "assistant", "content": ""}),
            serving._choice(0, delta={"content": "Hi"}, logprobs=chat_logprobs),
            serving._choice(1, delta={}, finish_reason="stop", stop_reason=None),
        ],
    }
    models = {"completion": p.CompletionChoice, "chat": p.ChatChunkChoice}
    for kind, choices in cases.items():
        job = serving.new_job(kind, "m", [], SamplingParams(), None, include_usage=include_usage)
        for choice in choices:
            reference = serving._sse(serving._chunk(job, [models[kind].model_validate(choice)]))
            assert serving._sse(serving._choice_chunk(job, choice)) == reference
