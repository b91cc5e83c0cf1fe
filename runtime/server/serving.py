"""Completions and chat completions: OpenAI requests in, engine requests, OpenAI responses out.

Both endpoints share one path: read the body (JSON, within the size limit), encode the
prompt(s) off the event loop (`prompts.PromptEncoder`), build SamplingParams and check
them with the engine's admission rules, add one engine request per prompt (the engine
fans out `n`), then either wait for the final outputs or stream deltas as server-sent
events. Outputs are cumulative; the deltas are cut from them here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from brim.runtime.engine.engine import FailedRequestOutput
from brim.runtime.engine.outputs import CompletionOutput, RequestOutput
from brim.runtime.sampling_params import SamplingParams
from brim.runtime.server import protocol as p
from brim.runtime.server.async_engine import EngineStepError, RequestStream
from brim.runtime.server.errors import APIError, from_validation_error, invalid_request
from brim.runtime.server.prompts import Prompt


class ShutdownError(Exception):
    """The server is shutting down and this request outlived the drain timeout."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"The server is shutting down and this request did not finish within "
                         f"its drain timeout of {timeout:g} s (--shutdown-timeout). Retry it.")


@dataclass(slots=True)
class ChoiceState:
    """What a stream has sent of one choice so far."""

    num_chars: int = 0
    num_tokens: int = 0
    started: bool = False
    finished: bool = False


@dataclass(slots=True)
class Job:
    """One OpenAI request turned into engine requests (one per prompt)."""

    kind: str  # "completion" or "chat"
    request_id: str
    model: str
    created: int
    prompts: list[Prompt]
    params: SamplingParams
    num_logprobs: int | None  # alternatives per token to return; None: no logprobs
    echo: bool = False
    include_usage: bool = False
    cache_salt: str | None = None  # prefix-cache isolation (protocol.SamplingFields.cache_salt)
    streams: list[RequestStream] = field(default_factory=list)
    # How the client named what the engine calls otherwise ("logprobs" -> "top_logprobs").
    aliases: dict[str, str] = field(default_factory=dict)


# -- request -> engine ----------------------------------------------------------------


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def read_json(raw: Request, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """The body as `model`: 415 unless it is JSON, 413 as soon as it passes max_bytes.

    The body is counted as it arrives, so a chunked upload (no Content-Length) costs at
    most max_bytes of memory before it is refused; what is left unread is discarded.
    """
    content_type = raw.headers.get("content-type", "")
    if not is_json(content_type):
        shown = f"'{content_type}'" if content_type else "none"
        raise APIError(415, f"This endpoint takes a JSON body: send 'Content-Type: "
                       f"application/json' (got {shown}).", code="unsupported_media_type")
    chunks, num_bytes = [], 0
    async for chunk in raw.stream():
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise body_too_large(max_bytes)
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        raise from_validation_error(exc, model) from None


def body_too_large(max_bytes: int, num_bytes: int | None = None) -> APIError:
    size = f"is {num_bytes} bytes," if num_bytes is not None else "is"
    return APIError(413, f"The request body {size} more than this server's limit of "
                    f"{max_bytes} bytes (--max-request-body-bytes). Send a smaller request, "
                    "or raise the limit.", code="request_too_large")


def build_sampling_params(req: p.SamplingFields, max_tokens: int | None,
                          num_logprobs: int | None, aliases: dict[str, str] | None = None
                          ) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            seed=req.seed,
            n=req.n,
            logprobs=num_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except ValueError as exc:
        raise invalid_request(exc, aliases) from None


def check_prompts(prompts: list[Prompt], params: SamplingParams, engine, prompt_param: str,
                  aliases: dict[str, str] | None = None) -> None:
    """The engine's own admission rules, checked before queueing so errors come back at once
    (each prompt, and what the request asks for in all: n x prompts, generated tokens)."""
    try:
        engine.check([prompt.token_ids for prompt in prompts], params)
    except ValueError as exc:
        raise invalid_request(exc, aliases, prompt_param) from None


async def start(job: Job, engine, arrival_time: float, prompt_param: str) -> None:
    """Add every prompt's request; on any refusal, take back the ones already added."""
    try:
        for i, prompt in enumerate(job.prompts):
            req_id = job.request_id if len(job.prompts) == 1 else f"{job.request_id}-{i}"
            stream = await engine.add(req_id, prompt.token_ids, job.params, prompt=prompt.text,
                                      arrival_time=arrival_time, cache_salt=job.cache_salt)
            job.streams.append(stream)
    except BaseException as exc:
        abort_all(job)
        if isinstance(exc, ValueError):
            raise invalid_request(exc, job.aliases, prompt_param) from None
        if isinstance(exc, EngineStepError):
            raise APIError(503, f"The engine is not available: {exc}.") from None
        if isinstance(exc, ShutdownError):
            raise APIError(503, str(exc), code="shutting_down") from None
        raise


def abort_all(job: Job) -> None:
    for stream in job.streams:
        stream.abort()


def _checked(output: RequestOutput) -> RequestOutput:
    if isinstance(output, FailedRequestOutput):  # the engine finished it: a step failed on it
        raise EngineStepError(f"the engine failed on this request: {output.error}")
    return output


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, _checked(output)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, _checked(item)
    finally:
        for task in tasks:
            task.cancel()


# -- engine -> response -----------------------------------------------------------------


def usage(job: Job, finals: list[RequestOutput | None]) -> p.Usage:
    prompt_tokens = sum(len(pr.token_ids) for pr in job.prompts)
    completion_tokens = sum(len(c.token_ids) for out in finals if out for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals if out)
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details={"cached_tokens": cached})


def _top(entry: dict, k: int) -> list:
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return [(tid, lp) for tid, lp in ranked if lp.rank <= k][:k]


def completion_logprobs(c: CompletionOutput, start: int, end: int, k: int,
                        text_offset: int) -> p.CompletionLogprobs:
    out = p.CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        chosen = entry[token_id]
        out.tokens.append(chosen.decoded_token)
        out.token_logprobs.append(chosen.logprob)
        out.top_logprobs.append({lp.decoded_token: lp.logprob for _, lp in _top(entry, k)})
        out.text_offset.append(offset)
        offset += len(chosen.decoded_token)
    return out


def chat_logprobs(c: CompletionOutput, start: int, end: int, k: int) -> p.ChatLogprobs:
    content = []
    for token_id, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
        chosen = entry[token_id]
        content.append(p.ChatTokenLogprob(
            token=chosen.decoded_token, logprob=chosen.logprob,
            bytes=list(chosen.decoded_token.encode()),
            top_logprobs=[p.TopLogprob(token=lp.decoded_token, logprob=lp.logprob,
                                       bytes=list(lp.decoded_token.encode()))
                          for _, lp in _top(entry, k)],
        ))
    return p.ChatLogprobs(content=content)


def full_response(job: Job, finals: list[RequestOutput]) -> dict:
    n = job.params.n
    choices = []
    for i, out in enumerate(finals):
        for c in out.outputs:
            index = i * n + c.index
            if job.kind == "chat":
                logprobs = (chat_logprobs(c, 0, len(c.token_ids), job.num_logprobs)
                            if job.num_logprobs is not None else None)
                choices.append(p.ChatChoice(
                    index=index, message=p.ChatResponseMessage(content=c.text),
                    logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            else:
                prefix = (job.prompts[i].text or "") if job.echo else ""
                logprobs = (completion_logprobs(c, 0, len(c.token_ids), job.num_logprobs,
                                                len(prefix))
                            if job.num_logprobs is not None else None)
                choices.append(p.CompletionChoice(
                    index=index, text=prefix + c.text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    choices.sort(key=lambda choice: choice.index)
    cls = p.ChatCompletionResponse if job.kind == "chat" else p.CompletionResponse
    return cls(id=job.request_id, created=job.created, model=job.model, choices=choices,
               usage=usage(job, finals)).model_dump()


async def wait_for_disconnect(raw: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def respond_full(job: Job, raw: Request) -> JSONResponse | None:
    """Wait for every final output; a client that leaves aborts the request."""

    async def collect() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(job.streams)
        async for i, output in merged(job.streams):
            finals[i] = output
        return finals

    collector = asyncio.create_task(collect())
    watcher = asyncio.create_task(wait_for_disconnect(raw))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            collector.cancel()
            abort_all(job)
            return JSONResponse({}, status_code=499)  # nobody is listening
        finals = collector.result()
    except EngineStepError as exc:
        raise APIError(500, f"The request failed inside the engine: {exc}.") from None
    except ShutdownError as exc:
        raise APIError(503, str(exc), code="shutting_down") from None
    finally:
        watcher.cancel()
        collector.cancel()
        abort_all(job)
    return JSONResponse(full_response(job, finals))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chunk(job: Job, choices: list, usage_value: p.Usage | None = None) -> dict:
    if job.kind == "chat":
        data = p.ChatCompletionChunk(id=job.request_id, created=job.created, model=job.model,
                                     choices=choices, usage=usage_value).model_dump()
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    else:
        data = p.CompletionResponse(id=job.request_id, created=job.created, model=job.model,
                                    choices=choices, usage=usage_value).model_dump()
    if not job.include_usage:
        del data["usage"]
    return data


def _choice(index: int, *, text: str | None = None, delta: dict | None = None,
            logprobs: dict | None = None, finish_reason: str | None = None,
            stop_reason: str | int | None = None) -> dict:
    """A streamed choice as `protocol.CompletionChoice` (text) or `ChatChunkChoice` (delta,
    its None fields left out) dumps it: the same keys in the same order. Built as a dict:
    pydantic objects per token were a measurable share of the event loop's time under load."""
    choice: dict = {"index": index}
    if delta is None:
        choice["text"] = text
    else:
        choice["delta"] = delta
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    choice["stop_reason"] = stop_reason
    return choice


def _choice_chunk(job: Job, choice: dict) -> dict:
    """`_chunk(job, [choice])` for a `_choice` dict, without pydantic (per token)."""
    data = {"id": job.request_id,
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        data["usage"] = None
    data["system_fingerprint"] = None
    return data


def stream_deltas(job: Job, i: int, out: RequestOutput, states: dict,
                  holdback: int) -> list[dict]:
    """The chunk choices (`_choice` dicts) for what `out` adds to what was sent."""
    choices = []
    n = job.params.n
    for c in out.outputs:
        index = i * n + c.index
        state = states.setdefault(index, ChoiceState())
        if state.finished:
            continue
        if job.kind == "chat" and not state.started:
            # OpenAI's first chunk of a choice carries the role and no text.
            choices.append(_choice(index, delta={"role": "assistant", "content": ""}))
        prefix = (job.prompts[i].text or "") if job.echo and not state.started else ""
        state.started = True
        # Hold back the characters a stop string could still claim (they are cut if it matches).
        end = len(c.text) if c.finished else max(state.num_chars, len(c.text) - holdback)
        text = c.text[state.num_chars:end]
        num_tokens = len(c.token_ids)
        logprobs = None
        if job.num_logprobs is not None and num_tokens > state.num_tokens:
            logprobs = (chat_logprobs(c, state.num_tokens, num_tokens, job.num_logprobs)
                        if job.kind == "chat" else
                        completion_logprobs(c, state.num_tokens, num_tokens, job.num_logprobs,
                                            len(prefix) + state.num_chars))
        if not (prefix or text or logprobs or c.finished):
            continue
        finish = c.finish_reason if c.finished else None
        stop_reason = c.stop_reason if c.finished else None
        logprobs = logprobs.model_dump() if logprobs is not None else None
        if job.kind == "chat":
            choices.append(_choice(index, delta={"content": text} if text else {},
                                   logprobs=logprobs, finish_reason=finish,
                                   stop_reason=stop_reason))
        else:
            choices.append(_choice(index, text=prefix + text, logprobs=logprobs,
                                   finish_reason=finish, stop_reason=stop_reason))
        state.num_chars = end
        state.num_tokens = num_tokens
        state.finished = c.finished
    return choices


async def stream_events(job: Job) -> AsyncIterator[str]:
    """Server-sent events: chunks as tokens arrive, the usage chunk if asked, `[DONE]`.

    A client that disconnects cancels this generator; `finally` aborts the requests.
    """
    holdback = max((len(s) for s in job.params.stop), default=1) - 1
    if job.params.include_stop_str_in_output:
        holdback = 0
    states: dict[int, ChoiceState] = {}
    finals: list[RequestOutput | None] = [None] * len(job.streams)
    try:
        async for i, out in merged(job.streams):
            choices = stream_deltas(job, i, out, states, holdback)
            if out.finished:
                finals[i] = out
            for choice in choices:  # one choice per chunk, as OpenAI streams them
                yield _sse(_choice_chunk(job, choice))
        if job.include_usage:
            yield _sse(_chunk(job, [], usage(job, finals)))
    except EngineStepError as exc:
        yield _sse(APIError(500, f"The request failed inside the engine: {exc}.").to_dict())
    except ShutdownError as exc:
        yield _sse(APIError(503, str(exc), code="shutting_down").to_dict())
    finally:
        abort_all(job)
    yield "data: [DONE]\n\n"


def respond_stream(job: Job) -> StreamingResponse:
    return StreamingResponse(stream_events(job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def new_job(kind: str, model: str, prompts: list[Prompt], params: SamplingParams,
            num_logprobs: int | None, *, echo: bool = False, include_usage: bool = False,
            cache_salt: str | None = None, aliases: dict[str, str] | None = None) -> Job:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Job(kind=kind, request_id=p.random_id(prefix), model=model, created=int(time.time()),
               prompts=prompts, params=params, num_logprobs=num_logprobs, echo=echo,
               include_usage=include_usage, cache_salt=cache_salt, aliases=aliases or {})


def chat_aliases(req: p.ChatCompletionRequest) -> dict[str, str]:
    """The chat API's names for the engine's `logprobs` and `max_tokens`."""
    aliases = {"logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        aliases["max_tokens"] = "max_completion_tokens"
    return aliases
