"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server reports goes through `APIError`, so clients (the `openai` library
included) get the status, the type they branch on, and a message that says what was asked,
what the limit is and what to change.
"""

from __future__ import annotations

import annotated_types
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

# status -> the `type` OpenAI's API uses for it (clients map statuses to exception classes).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request the server refuses or could not complete.

    param: the request field at fault (OpenAI's `param`), when one is.
    code: a stable machine-readable reason, e.g. "context_length_exceeded".
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status_code, "server_error")
        self.headers = headers

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.to_dict(), status_code=self.status_code, headers=headers)


def invalid_param(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError, model: type[BaseModel] | None = None
                          ) -> APIError:
    """The first pydantic error, naming the field as OpenAI's `param` (dotted path) and,
    for a number out of range, the whole range declared on `model`'s field."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return invalid_param(None, f"The request body is not valid JSON: {first['msg']}.")
    if first.get("type") == "model_type":
        return invalid_param(None, "The request body must be a JSON object.")
    if first.get("type") == "missing":
        return invalid_param(param, f"Missing required parameter: '{param}'.")
    received = first.get("input")
    shown = _shown(received)
    allowed = _declared_range(model, loc) if first.get("type") in _RANGE_ERRORS else None
    if allowed is not None:
        return invalid_param(param, f"Invalid value for '{param}': must be {allowed}, got "
                                    f"{shown}.")
    message = first["msg"].removeprefix("Value error, ")
    return invalid_param(param, f"Invalid value for '{param}': {message} (got {shown}).")


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _shown(value) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _declared_range(model: type[BaseModel] | None, loc: list[str]) -> str | None:
    """"in (0, 1]", ">= 1": a top-level field's declared bounds, as the message states them."""
    if model is None or len(loc) != 1 or loc[0] not in model.model_fields:
        return None
    low = high = None
    for bound in model.model_fields[loc[0]].metadata:
        if isinstance(bound, (annotated_types.Ge, annotated_types.Gt)):
            low = bound
        elif isinstance(bound, (annotated_types.Le, annotated_types.Lt)):
            high = bound
    if low is not None and high is not None:
        opening = "[" if isinstance(low, annotated_types.Ge) else "("
        closing = "]" if isinstance(high, annotated_types.Le) else ")"
        return f"in {opening}{_bound(low)}, {_bound(high)}{closing}"
    if low is not None:
        return f"{'>=' if isinstance(low, annotated_types.Ge) else '>'} {_bound(low)}"
    if high is not None:
        return f"{'<=' if isinstance(high, annotated_types.Le) else '<'} {_bound(high)}"
    return None


def _bound(bound) -> object:
    for name in ("ge", "gt", "le", "lt"):
        if hasattr(bound, name):
            return getattr(bound, name)
    return bound


def invalid_request(exc: ValueError, aliases: dict[str, str] | None = None,
                    prompt_param: str | None = None) -> APIError:
    """A 400 for a request the engine's checks refused (SamplingParams, admission).

    aliases: the engine's name -> the API's, where they differ (chat's `top_logprobs` for
    `logprobs`, `max_completion_tokens` for `max_tokens`); param and message use the API's.
    prompt_param: what the prompt is called (`prompt`, `messages`).
    """
    from brim.runtime.engine.errors import (
        EmptyPromptError,
        InvalidParamError,
        InvalidTokenIdError,
        PromptTooLongError,
    )

    aliases = aliases or {}
    if isinstance(exc, PromptTooLongError):
        # The prompt alone too long: blame the prompt. Otherwise max_tokens is what to lower.
        max_tokens_name = aliases.get("max_tokens", "max_tokens")
        prompt_at_fault = exc.max_tokens is None or exc.prompt_len >= exc.max_model_len
        return APIError(400, exc.message_for(max_tokens_name),
                        param=prompt_param if prompt_at_fault else max_tokens_name,
                        code="context_length_exceeded")
    if isinstance(exc, InvalidParamError):
        name = aliases.get(exc.param, exc.param)
        if name == "prompt" and prompt_param is not None:
            name = prompt_param
        return invalid_param(name, exc.message_for(name))
    if isinstance(exc, (EmptyPromptError, InvalidTokenIdError)):
        return invalid_param(prompt_param, str(exc))
    return invalid_param(None, str(exc))
