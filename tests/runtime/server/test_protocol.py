"""Request schemas and error formatting, without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from brim.runtime.engine.errors import PromptTooLongError
from brim.runtime.server import protocol as p
from brim.runtime.server.errors import APIError, from_validation_error, sampling_error
from brim.runtime.server.serving import context_length_error


def test_error_shape_and_statuses():
    body = APIError(400, "bad", param="top_p").to_dict()
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "top_p", "code": None}}
    assert APIError(401, "x").type == "authentication_error"
    assert APIError(503, "x").type == "service_unavailable_error"
    assert APIError(500, "x").type == "server_error"
    assert APIError(401, "x").to_response().headers["www-authenticate"] == "Bearer"


def test_issue_budget_message():
    error = context_length_error(PromptTooLongError(4500, 27000, 31096), "messages")
    assert error.message.startswith(
        "Given your max_tokens=27000 request and max_model_len=31096, only 4096 tokens are "
        "available for the prompt, and your prompt has 4500 tokens.")
    assert (error.status_code, error.param, error.code) == (400, "max_tokens",
                                                            "context_length_exceeded")
    alone = context_length_error(PromptTooLongError(40000, 10, 31096), "messages")
    assert alone.param == "messages"
    assert alone.message.startswith("This model's maximum context length is 31096 tokens")


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": 3}]})
    error = from_validation_error(info.value)
    assert error.status_code == 400
    assert error.param.startswith("messages.0.content")
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest.model_validate({"messages": []})
    assert from_validation_error(info.value).param == "messages"


def test_sampling_errors_name_their_param():
    error = sampling_error(ValueError("stop strings must be non-empty"), {"stop"})
    assert (error.param, error.message) == ("stop", "stop strings must be non-empty")
    error = sampling_error(ValueError("the prompt is empty"), {"stop"})
    assert (error.param, error.message) == (None, "the prompt is empty")
    error = sampling_error(ValueError("top_k must be 0 or -1 (disabled), or a positive integer, "
                                      "got -5"), {"top_k"})
    assert error.param == "top_k"
    assert error.message == ("Invalid value for 'top_k': must be 0 or -1 (disabled), or a "
                             "positive integer, got -5.")


def test_prompt_forms_parse():
    assert p.CompletionRequest(prompt="hi").prompt == "hi"
    assert p.CompletionRequest(prompt=[1, 2]).prompt == [1, 2]
    assert p.CompletionRequest(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]
    assert p.CompletionRequest(prompt=["a", "b"]).prompt == ["a", "b"]
    assert p.CompletionRequest(prompt="x").max_tokens == 16  # OpenAI's default
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
