"""Prompts: API requests to text and token ids, off the event loop, each with a time budget.

A long prompt or a heavy chat template rendered on the event loop would stall /health and
every stream. So handlers never tokenize or render there:

- Tokenizing, detokenizing and the model's own chat template run on one worker thread
  with the handlers' tokenizer (one thread: Rust tokenizers are not thread-safe). That
  code is trusted and its time grows with the body, which --max-request-body-bytes
  bounds; a handler waits for it at most `timeout` seconds once it runs, then answers 400.
- A chat template sent with the request (only with --trust-request-chat-template) is
  untrusted code: it renders in a separate process with transformers' own sandboxed Jinja
  environment, one template at a time, under a memory limit and an output cap. Past
  `timeout` seconds the process is killed — no runaway loop keeps burning a core — and a
  fresh one is started for the next request.

Errors are 400s naming the parameter; none echoes the template back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from brim.runtime.server.errors import APIError, invalid_param

logger = logging.getLogger(__name__)

# apply_chat_template's own arguments: not template variables, so not settable through
# chat_template_kwargs (tools and documents are template inputs and pass through).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "add_generation_prompt", "continue_final_message", "tokenize", "padding",
    "truncation", "max_length", "return_tensors", "return_dict", "tokenizer_kwargs",
    "return_assistant_tokens_mask", "sanitize_control_tokens", "messages",
})
# The template worker's address space beyond what it has after its imports.
_WORKER_MEMORY_BYTES = 1 << 30


@dataclass(slots=True)
class Prompt:
    text: str | None  # None for a prompt sent as token ids (unless echoed)
    token_ids: list[int]


class PromptEncoder:
    """The handlers' way from text to token ids and back (see the module docstring).

    tokenizer: the handlers' own tokenizer (never the engine's).
    timeout: seconds a rendering or an encoding may take.
    max_template_chars: the longest text a request's template may render.
    """

    def __init__(self, tokenizer, *, timeout: float, trust_request_chat_template: bool,
                 max_template_chars: int) -> None:
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.trust_request_chat_template = trust_request_chat_template
        self.max_template_chars = max_template_chars
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="brim-tokenizer")
        self._template_worker: TemplateWorker | None = None
        self._template_thread = ThreadPoolExecutor(1, thread_name_prefix="brim-template")
        template = getattr(tokenizer, "chat_template", None)
        # A model may ship named templates; naming one of those in a request is trusted.
        self._named_templates = set(template) if isinstance(template, dict) else set()

    def start(self) -> None:
        if self.trust_request_chat_template:
            self._template_worker = TemplateWorker()
            self._template_worker.start()  # imports in the background, ready when needed

    def close(self) -> None:
        if self._template_worker is not None:
            self._template_worker.stop()
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._template_thread.shutdown(wait=False, cancel_futures=True)

    # -- the tokenizer thread ---------------------------------------------------------------

    async def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return await self._on_thread(
            lambda: [self.tokenizer.encode(t, add_special_tokens=add_special_tokens)
                     for t in texts], "tokenizing the prompt")

    async def decode(self, token_ids: list[int]) -> str:
        return await self._on_thread(lambda: self.tokenizer.decode(token_ids),
                                     "detokenizing")

    async def chat(self, messages: list[dict], *, add_generation_prompt: bool,
                   chat_template: str | None, kwargs: dict) -> tuple[str, list[int]]:
        """The prompt text of a conversation and its token ids."""
        bad = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if bad:
            raise invalid_param(f"chat_template_kwargs.{bad[0]}", f"'{bad[0]}' is not a chat "
                                "template variable: remove it from chat_template_kwargs.")
        if chat_template is not None and chat_template not in self._named_templates:
            if not self.trust_request_chat_template:
                raise invalid_param("chat_template", "This server does not accept chat "
                                    "templates in requests: it renders the model's own. Remove "
                                    "chat_template, or start the server with "
                                    "--trust-request-chat-template.")
            text = await self._render_request_template(messages, chat_template,
                                                       add_generation_prompt, kwargs)
            token_ids = await self._on_thread(
                lambda: self.tokenizer.encode(text, add_special_tokens=False),
                "tokenizing the rendered prompt")
            return text, token_ids

        def render() -> tuple[str, list[int]]:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                    chat_template=chat_template, **kwargs)
            except Exception as exc:  # the template's own checks (roles, order) raise here
                raise invalid_param("messages", "The model's chat template refused these "
                                    f"messages: {_describe(exc)}") from None
            return text, self.tokenizer.encode(text, add_special_tokens=False)

        return await self._on_thread(render, "rendering the chat template")

    async def _on_thread(self, fn, what: str):
        """fn() on the tokenizer thread; at most `timeout` seconds once it starts."""
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def job():
            loop.call_soon_threadsafe(_set_once, started)
            return fn()

        future = loop.run_in_executor(self._thread, job)
        await asyncio.wait({started, future}, return_when=asyncio.FIRST_COMPLETED)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise APIError(400, f"The request took longer than this server's budget of "
                           f"{self.timeout:g} s for {what} (--chat-template-timeout). Send a "
                           "shorter prompt.", code="timeout") from None

    # -- the template process ---------------------------------------------------------------

    async def _render_request_template(self, messages, template, add_generation_prompt,
                                       kwargs) -> str:
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items()
                   if isinstance(v, str)}
        job = {"template": template, "messages": messages,
               "add_generation_prompt": add_generation_prompt,
               "kwargs": {**special, **kwargs}, "max_chars": self.max_template_chars}
        loop = asyncio.get_running_loop()
        status, value = await loop.run_in_executor(
            self._template_thread, self._template_worker.render, job, self.timeout)
        if status == "ok":
            return value
        if status == "timeout":
            raise APIError(400, f"The chat template took longer than this server's budget "
                           f"of {self.timeout:g} s to render (--chat-template-timeout) and "
                           "was stopped. Simplify the template.", param="chat_template",
                           code="timeout")
        raise invalid_param("chat_template", f"The request's chat template failed: {value}")


# -- API requests to prompts ---------------------------------------------------------------


async def completion_prompts(encoder: PromptEncoder, req) -> list[Prompt]:
    raw_prompt = req.prompt
    if isinstance(raw_prompt, str):
        items = [raw_prompt]
    elif raw_prompt and all(isinstance(t, int) for t in raw_prompt):
        items = [raw_prompt]  # one prompt as token ids
    else:
        items = list(raw_prompt)
    if not items:
        raise invalid_param("prompt", "The prompt is empty: give a string, a list of strings, "
                            "or token ids.")
    texts = [item for item in items if isinstance(item, str)]
    encoded = iter(await encoder.encode(texts)) if texts else iter(())
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(item, next(encoded)))
        else:
            prompts.append(Prompt(None, list(item)))
    if req.echo:  # the echoed text of prompts given as token ids
        for prompt in prompts:
            if prompt.text is None and _in_vocabulary(prompt.token_ids, encoder):
                prompt.text = await encoder.decode(prompt.token_ids)
    return prompts


def _in_vocabulary(token_ids: list[int], encoder: PromptEncoder) -> bool:
    # Admission refuses the others with the vocabulary in the message; no decoding first.
    size = len(encoder.tokenizer)
    return all(0 <= t < size for t in token_ids)


async def chat_prompt(encoder: PromptEncoder, req) -> Prompt:
    """The conversation through the chat template (the model's, or the request's when the
    server trusts request templates), as text and token ids."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    kwargs = dict(getattr(req, "chat_template_kwargs", None) or {})
    template = getattr(req, "chat_template", None)
    in_kwargs = kwargs.pop("chat_template", None)
    template = template if template is not None else in_kwargs
    if template is not None and not isinstance(template, str):
        raise invalid_param("chat_template", "chat_template must be a string (a Jinja template "
                            "or the name of one of the model's templates).")
    text, token_ids = await encoder.chat(messages, add_generation_prompt=req.add_generation_prompt,
                                         chat_template=template, kwargs=kwargs)
    return Prompt(text, token_ids)


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _describe(exc: BaseException) -> str:
    """What went wrong, without the template's source (Jinja puts it in some messages)."""
    message = getattr(exc, "message", None) or str(exc)
    message = message.strip().splitlines()[0] if message.strip() else ""
    if len(message) > 200:
        message = message[:197] + "..."
    lineno = getattr(exc, "lineno", None)
    where = f" (template line {lineno})" if isinstance(lineno, int) else ""
    return f"{type(exc).__name__}: {message}{where}"


class TemplateWorker:
    """One process that renders untrusted chat templates; killed and replaced on timeout.

    A plain `python -P -c` child speaking JSON lines over its stdin and stdout (not
    multiprocessing's spawn, which re-imports the parent's main module, nor pickle, which
    would trust what the child sends back). `render` is called from one thread at a time
    (PromptEncoder's template thread).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._ready = False

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-P", "-c", "from brim.runtime.server.prompts import "
                                         "_worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")
        self._ready = False

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            for pipe in (self._process.stdin, self._process.stdout):
                pipe.close()
            self._process = None

    def render(self, job: dict, timeout: float) -> tuple[str, str]:
        """("ok", text), ("error", what went wrong) or ("timeout", "")."""
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self.start()
        try:
            if not self._ready:  # a new worker first finishes its imports: not the job's time
                if self._readline(60.0) != "ready":
                    self.stop()
                    return "error", "the template worker did not start"
                self._ready = True
            self._process.stdin.write(json.dumps(job) + "\n")
            self._process.stdin.flush()
            line = self._readline(timeout)
        except (OSError, ValueError):  # it died (past its memory limit, a crash)
            line = ""
        if line:
            status, value = json.loads(line)
            return status, value
        if self._process.poll() is not None:
            self.stop()
            return "error", "the template worker died rendering it (too much memory?)"
        logger.warning("a request's chat template ran past %.1f s; killing its worker", timeout)
        self.stop()
        self.start()  # the next one is ready by the time it is needed
        return "timeout", ""

    def _readline(self, timeout: float) -> str | None:
        """The next line, or None when none came within timeout ("" at end of file)."""
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        if not ready:
            return None
        return self._process.stdout.readline().rstrip("\n")


def _worker_main() -> None:
    """The template process: render the jobs read from stdin until it closes."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints go to stderr, never into the replies
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from transformers.utils.chat_template_utils import _compile_jinja_template

    _limit_memory(_WORKER_MEMORY_BYTES)
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = ["ok", _render(_compile_jinja_template, json.loads(line))]
        except MemoryError:
            reply = ["error", "MemoryError: the template used more memory than allowed"]
        except Exception as exc:
            reply = ["error", _describe(exc)]
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _render(compile_template, job: dict) -> str:
    """As transformers' render_jinja_template, streamed so the output can be capped."""
    template = compile_template(job["template"])
    kwargs = dict(job["kwargs"])
    pieces, num_chars = [], 0
    for piece in template.generate(messages=job["messages"], tools=kwargs.pop("tools", None),
                                   documents=kwargs.pop("documents", None),
                                   add_generation_prompt=job["add_generation_prompt"],
                                   **kwargs):
        num_chars += len(piece)
        if num_chars > job["max_chars"]:
            raise ValueError(f"the rendered prompt is longer than {job['max_chars']} "
                             "characters")
        pieces.append(piece)
    return "".join(pieces)


def _limit_memory(extra_bytes: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, current + extra_bytes))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: no limit
