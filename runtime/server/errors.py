"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server reports goes through `APIError`, so clients (the `openai` library
included) get the status, the type they branch on, and a message that says what was asked,
what the limit is and what to change.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

# status -> the `type` OpenAI's API uses for it (clients map statuses to exception classes).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
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
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status_code, "server_error")

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
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None
        return JSONResponse(self.to_dict(), status_code=self.status_code, headers=headers)


def invalid_param(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, naming the field as OpenAI's `param` (dotted path)."""
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
    shown = repr(received) if not isinstance(received, (dict, list)) else type(received).__name__
    message = first["msg"].removeprefix("Value error, ")
    return invalid_param(param, f"Invalid value for '{param}': {message} (got {shown}).")


def sampling_error(exc: ValueError, known_params: set[str]) -> APIError:
    """A SamplingParams check ("top_p must be in (0, 1], got 2.0") as a 400 naming its param."""
    message = str(exc)
    first_word, _, rest = message.partition(" ")
    if first_word not in known_params:
        return invalid_param(None, message)
    if rest.startswith("must "):  # "top_p must be in (0, 1], got 2.0"
        message = f"Invalid value for '{first_word}': {rest}."
    return invalid_param(first_word, message)
