"""OpenAI's request and response schemas (the fields brim serves), as pydantic models.

Requests ignore fields they do not know, as OpenAI-compatible servers do, so clients
that send newer fields keep working; fields brim knows but cannot honour are refused
with a 400 naming them (see `unsupported`). brim's extras beyond OpenAI: `top_k`,
`min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `cache_salt`, and for chat `chat_template` and
`chat_template_kwargs`.

The static ranges are declared here, so that /openapi.json states them; the ones that
depend on the model or the server's flags (the vocabulary, max_model_len, --max-n,
--max-logprobs, ...) are the engine's admission rules (`engine/admission.py`). These
models are also the OpenAPI document's request and response schemas (`openapi_schemas`).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from brim.runtime.sampling_params import SEED_MAX, SEED_MIN


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# Requests ignore unknown fields, and take JSON types as the document states them: strict,
# so that `"n": true` or `"max_tokens": "5"` is a 400 (an int is still a valid float).
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = REQUEST_CONFIG

    model: str | None = None
    n: int = Field(default=1, ge=1, description="completions per prompt (at most --max-n)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        default=None, description="stop strings (at most --max-stop-strings, each at most "
                                  "--max-stop-string-len characters)")
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    temperature: float | None = Field(default=None, ge=0, description="0 is greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # brim's extras (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0: no limit")
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(
        default=None, description="token ids in the model's vocabulary (at most "
                                  "--max-stop-token-ids)")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Prefix caching: requests share cached KV blocks only with requests of the same salt
    # (None shares with every other unsalted request). Isolates tenants from each other.
    cache_salt: str | None = Field(default=None, min_length=1)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a field brim knows but cannot honour, if one is set."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, (f"{name} is not supported by brim yet; "
                              f"remove it or set it to 0 (got {getattr(self, name)}).")
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by brim yet; remove it."
        return None


# Completions: an unset or null max_tokens is OpenAI's documented default, 16.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(
        default=DEFAULT_COMPLETION_MAX_TOKENS, ge=1,
        description=f"default (also when null) {DEFAULT_COMPLETION_MAX_TOKENS}, as OpenAI's")
    logprobs: int | None = Field(default=None, ge=0,
                                 description="alternatives per token (at most --max-logprobs)")
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported by brim; remove it."
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", (f"best_of={self.best_of} is not supported by brim; use n "
                               f"(got n={self.n}) and leave best_of unset.")
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = REQUEST_CONFIG

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # Unset or null: what max_model_len leaves after the prompt. max_tokens is deprecated
    # by OpenAI in favour of max_completion_tokens; the latter wins when both are given.
    max_tokens: int | None = Field(default=None, ge=1,
                                   description="default (also when null): what "
                                               "max_model_len leaves after the prompt")
    max_completion_tokens: int | None = Field(default=None, ge=1,
                                              description="max_tokens' newer name")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0,
                                     description="alternatives per token (at most "
                                                 "--max-logprobs); needs logprobs=true")
    add_generation_prompt: bool = True
    # vLLM's: a Jinja template that replaces the model's; refused unless the server runs
    # with --trust-request-chat-template (also accepted inside chat_template_kwargs).
    chat_template: str | None = Field(
        default=None, description="replaces the model's chat template; needs a server "
                                  "started with --trust-request-chat-template")
    chat_template_kwargs: dict | None = Field(
        default=None, description="extra variables for the chat template")

    def unsupported(self) -> tuple[str, str] | None:
        for part_list in (m.content for m in self.messages):
            if isinstance(part_list, list):
                for part in part_list:
                    if part.type != "text":
                        return "messages", (f"content parts of type {part.type!r} are not "
                                            "supported: this model reads text only.")
        return super().unsupported()


class TokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template: str | None = None  # as ChatCompletionRequest's (with messages)
    chat_template_kwargs: dict | None = None


class DetokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = None
    tokens: list[int]


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


# -- responses ------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "brim"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers, in OpenAI's shape."""

    error: ErrorDetail


RESPONSE_MODELS = (CompletionResponse, ChatCompletionResponse, ChatCompletionChunk, ModelList,
                   TokenizeResponse, DetokenizeResponse, VersionResponse, ErrorResponse)


# -- the OpenAPI document -----------------------------------------------------------------
#
# The handlers read their bodies themselves (to count bytes as they arrive and to answer
# in OpenAI's error shape), so FastAPI cannot see these models: the routes declare them
# with request_body() and responses(), and build_openapi() adds their schemas.

ERROR_DESCRIPTIONS = {
    400: "An invalid parameter (`param` names it, the message gives the allowed range), or a "
         "prompt too long for max_model_len (`code` context_length_exceeded).",
    401: "The server runs with --api-key and the request lacks `Authorization: Bearer <key>`.",
    404: "`model` is not a name this server serves.",
    413: "The body is over --max-request-body-bytes.",
    415: "The body is not JSON (`Content-Type: application/json`).",
    500: "The engine failed on this request (the others and the server carry on).",
    503: "The queue is full (--max-queue-len), the engine loop is not running, or the server "
         "is shutting down.",
}
GENERATION_ERRORS = (400, 401, 404, 413, 415, 500, 503)
JSON_BODY_ERRORS = (400, 401, 404, 413, 415)


def schema_ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def request_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads `model` as its JSON body."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema_ref(model)}}}}


def responses(ok: type[BaseModel] | None, *errors: int, stream: bool = False,
              description: str = "Success.") -> dict:
    """A route's responses: 200 with `ok` as JSON (or server-sent events when `stream`),
    and each error status with OpenAI's error shape."""
    content = {}
    if ok is not None:
        content["application/json"] = {"schema": schema_ref(ok)}
    if stream:
        # OpenAPI before 3.2 (FastAPI writes 3.1) has an event stream's `schema` describe
        # one event: an object with its fields, as the SSE format parses them.
        content["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "description": "with stream=true: `data: <chunk JSON>` events, then `data: [DONE]`",
            "properties": {"data": {"type": "string",
                                    "description": "a chunk's JSON, or [DONE] after the last"}}}}
    out: dict = {200: {"description": description, "content": content}}
    for status in errors:
        out[status] = error_response(status)
    return out


def error_response(status: int) -> dict:
    return {"description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": schema_ref(ErrorResponse)}}}


def openapi_schemas() -> dict[str, dict]:
    """Every request and response model's JSON schema, for /openapi.json's components.

    Requests are documented as they are validated, responses as they are written.
    """
    from pydantic.json_schema import models_json_schema

    keys = [(m, "validation") for m in REQUEST_MODELS] + \
        [(m, "serialization") for m in RESPONSE_MODELS]
    _, top = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def build_openapi(app) -> dict:
    """The app's OpenAPI document: FastAPI's paths plus the models' schemas (cached)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description=app.description)
        document.setdefault("components", {}).setdefault("schemas", {}).update(
            openapi_schemas())
        app.openapi_schema = document
    return app.openapi_schema
