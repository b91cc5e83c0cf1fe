"""The FastAPI app: OpenAI's endpoints, /health, /metrics, /tokenize, /detokenize, /version.

`build_app(engine, settings)` wires an engine (anything with the Engine contract) to
HTTP. The engine loop starts with the app (lifespan) and stops with it.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from brim.runtime.server import protocol as p
from brim.runtime.server import serving
from brim.runtime.server.async_engine import AsyncEngine, EngineThread
from brim.runtime.server.errors import APIError, invalid_param
from brim.runtime.server.metrics import ServerMetrics
from brim.runtime.server.prompts import PromptEncoder, chat_prompt, completion_prompts
from brim.runtime.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# Paths that answer without the API key: probes, scrapers and the operator carry no
# credentials (and none of them reveals a request).
OPEN_PATHS = frozenset({"/health", "/metrics", "/memory"})


class ServerState:
    """What the handlers share: the engine loop, a tokenizer of their own, the limits."""

    def __init__(self, engine, settings: ServerSettings, tokenizer=None,
                 engine_thread: EngineThread | None = None) -> None:
        self.settings = settings
        self.model_name = settings.served_model_names[0]
        self.engine = AsyncEngine(engine, thread=engine_thread)
        self.limits = self.engine.limits
        self.max_model_len = self.limits.max_model_len
        self.model_path = str(self.engine.model_path)
        # The engine's tokenizer runs in the step thread; the handlers get their own so that
        # the two never share a (not thread-safe) Rust tokenizer.
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer = tokenizer
        # Tokenizing and chat templates run off the event loop, with a time budget.
        self.prompts = PromptEncoder(
            tokenizer, timeout=settings.chat_template_timeout,
            trust_request_chat_template=settings.trust_request_chat_template,
            max_template_chars=4 * settings.max_request_body_bytes)
        self.metrics = ServerMetrics(self.model_name, self.engine.memory_report,
                                     enable_vllm_metrics=settings.enable_vllm_metrics)
        self.engine.metrics = self.metrics
        self.created = int(time.time())

    def resolve_model(self, model: str | None) -> str:
        if model is None or model in self.settings.served_model_names:
            return model or self.model_name
        served = ", ".join(self.settings.served_model_names)
        raise APIError(404, f"The model `{model}` does not exist. This server serves: {served}.",
                       param="model", code="model_not_found")

    def check_queue(self) -> None:
        limit = self.settings.max_queue_len
        waiting = self.engine.num_waiting
        if limit is not None and waiting >= limit:
            raise APIError(
                503, f"The server is busy: {waiting} requests are waiting, the limit is {limit} "
                "(--max-queue-len). Retry later, or raise --max-queue-len.", code="queue_full")

    async def parse(self, raw: Request, model_cls: type[BaseModel]) -> BaseModel:
        return await serving.read_json(raw, model_cls, self.settings.max_request_body_bytes)


def check_body_size(num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise serving.body_too_large(limit, num_bytes)


def build_app(engine, settings: ServerSettings, *, tokenizer=None,
              engine_thread: EngineThread | None = None) -> FastAPI:
    """engine_thread: the thread `engine` was built on, to step it on (async_engine)."""
    state = ServerState(engine, settings, tokenizer, engine_thread)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        state.prompts.start()
        try:
            yield
        finally:
            await state.engine.stop()
            state.prompts.close()

    app = FastAPI(title="brim", version=_version(), lifespan=lifespan,
                  description="brim's OpenAI-compatible server (docs/server.md).")
    app.openapi = lambda: p.build_openapi(app)
    app.state.brim = state
    _add_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    _add_routes(app, state)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("brim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return invalid_param(param, f"Invalid value for '{param}': {first['msg']}.").to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(raw: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"No route {raw.method} {raw.url.path}; see /docs for the endpoints."
                   if exc.status_code in (404, 405) else str(exc.detail))
        return APIError(exc.status_code, message,
                        type="invalid_request_error" if exc.status_code < 500 else None,
                        headers=exc.headers).to_response()

    @app.exception_handler(Exception)
    async def internal_error(raw: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", raw.method, raw.url.path)
        return APIError(500, f"Internal server error: {exc!r}. The server keeps running; "
                        "please report this with the request that caused it.").to_response()


class Guard:
    """API key and body size, checked before a handler reads anything.

    Plain ASGI rather than @app.middleware("http"): that wrapper re-plumbs `receive`, which
    hides client disconnects from the handlers and buffers streaming responses.
    """

    def __init__(self, app, settings: ServerSettings) -> None:
        self.app = app
        self.limit = settings.max_request_body_bytes
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return APIError(401, "Missing or wrong API key: send it as the header "
                                "'Authorization: Bearer <key>' (the key the server was started "
                                "with, --api-key).", code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        if length.isdigit():
            try:
                check_body_size(int(length), self.limit)
            except APIError as exc:
                return exc
        return None


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_class=Response,
             responses={200: {"description": "The model is loaded and the engine loop runs "
                                             "(empty body)."}, 503: p.error_response(503)})
    async def health() -> Response:
        if state.engine.is_alive:
            return Response(status_code=200)
        return APIError(503, "The engine loop is not running.", code="engine_dead").to_response()

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format."}})
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/memory", responses={200: {"description": "The memory report (JSON).",
                                         "content": {"application/json": {"schema": {
                                             "type": "object"}}}}})
    async def memory() -> dict:
        """How the engine sized its KV cache: predicted beside measured (MemoryReport)."""
        return state.engine.memory_report.to_json()

    @app.get("/version", responses=p.responses(p.VersionResponse, 401))
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/v1/models", responses=p.responses(p.ModelList, 401))
    async def models() -> dict:
        cards = [p.ModelCard(id=name, created=state.created, root=state.model_path,
                             max_model_len=state.max_model_len).model_dump()
                 for name in state.settings.served_model_names]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", openapi_extra=p.request_body(p.CompletionRequest),
              responses=p.responses(p.CompletionResponse, *p.GENERATION_ERRORS, stream=True))
    async def completions(raw: Request) -> Response:
        arrival = time.monotonic()
        req = await state.parse(raw, p.CompletionRequest)
        model = state.resolve_model(req.model)
        _refuse_unsupported(req)
        if req.echo and req.logprobs is not None:
            raise invalid_param("echo", "echo together with logprobs is not supported (it would "
                                "need the prompt's logprobs); drop one of them.")
        # null is the documented default (OpenAI's 16), as when the field is left out.
        max_tokens = p.DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else \
            req.max_tokens
        params = serving.build_sampling_params(req, max_tokens, req.logprobs)
        prompts = await completion_prompts(state.prompts, req)
        serving.check_prompts(prompts, params, state.engine, "prompt")
        state.check_queue()
        job = serving.new_job("completion", model, prompts, params, req.logprobs, echo=req.echo,
                              include_usage=_include_usage(req), cache_salt=req.cache_salt)
        await serving.start(job, state.engine, arrival, "prompt")
        return serving.respond_stream(job) if req.stream else await serving.respond_full(job, raw)

    @app.post("/v1/chat/completions", openapi_extra=p.request_body(p.ChatCompletionRequest),
              responses=p.responses(p.ChatCompletionResponse, *p.GENERATION_ERRORS,
                                    stream=True))
    async def chat_completions(raw: Request) -> Response:
        arrival = time.monotonic()
        req = await state.parse(raw, p.ChatCompletionRequest)
        model = state.resolve_model(req.model)
        _refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs needs logprobs=true.")
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # Unset or null: what max_model_len leaves after the prompt (admission works it out).
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        aliases = serving.chat_aliases(req)
        params = serving.build_sampling_params(req, max_tokens, num_logprobs, aliases)
        prompt = await chat_prompt(state.prompts, req)
        serving.check_prompts([prompt], params, state.engine, "messages", aliases)
        state.check_queue()
        job = serving.new_job("chat", model, [prompt], params, num_logprobs,
                              include_usage=_include_usage(req), cache_salt=req.cache_salt,
                              aliases=aliases)
        await serving.start(job, state.engine, arrival, "messages")
        return serving.respond_stream(job) if req.stream else await serving.respond_full(job, raw)

    @app.post("/tokenize", openapi_extra=p.request_body(p.TokenizeRequest),
              responses=p.responses(p.TokenizeResponse, *p.JSON_BODY_ERRORS))
    async def tokenize(raw: Request) -> dict:
        req = await state.parse(raw, p.TokenizeRequest)
        state.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise invalid_param("prompt", "Give exactly one of 'prompt' or 'messages'.")
        if req.messages is not None:
            tokens = (await chat_prompt(state.prompts, req)).token_ids
        else:
            [tokens] = await state.prompts.encode([req.prompt], req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}

    @app.post("/detokenize", openapi_extra=p.request_body(p.DetokenizeRequest),
              responses=p.responses(p.DetokenizeResponse, *p.JSON_BODY_ERRORS))
    async def detokenize(raw: Request) -> dict:
        req = await state.parse(raw, p.DetokenizeRequest)
        state.resolve_model(req.model)
        vocab_size = state.limits.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab_size]
        if bad:
            raise invalid_param("tokens", f"Token ids must be in [0, {vocab_size}); got "
                                f"{bad[:5]}.")
        return {"prompt": await state.prompts.decode(req.tokens)}


def _refuse_unsupported(req: p.SamplingFields) -> None:
    refused = req.unsupported()
    if refused is not None:
        raise invalid_param(*refused)


def _include_usage(req: p.SamplingFields) -> bool:
    if req.stream_options is not None and not req.stream:
        raise invalid_param("stream_options", "stream_options is only allowed with stream=true.")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)
