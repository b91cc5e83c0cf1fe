"""Errors a caller can act on; each message says what was asked, the limit and what to do."""

from __future__ import annotations


class InvalidParamError(ValueError):
    """A request parameter outside what the engine accepts.

    param: the SamplingParams field at fault ("top_k", "stop_token_ids", ...).
    template: the API's message, with "{param}" where the field's name goes. Callers that
        know the field by another name (the chat API's `top_logprobs` for `logprobs`) ask
        for `message_for(their_name)`.
    plain: str() of the error, for the engine's own callers (default: message_for(param)).
    """

    def __init__(self, param: str, template: str, plain: str | None = None) -> None:
        self.param = param
        self.template = template
        super().__init__(plain or self.message_for(param))

    def message_for(self, name: str) -> str:
        return self.template.replace("{param}", name)


def out_of_range(param: str, allowed: str, value, plain: str | None = None
                 ) -> InvalidParamError:
    """"top_p must be in (0, 1], got 2.0"; to the API, "Invalid value for 'top_p': must be
    in (0, 1], got 2.0." """
    shown = _shown(value)
    return InvalidParamError(param, f"Invalid value for '{{param}}': must be {allowed}, got "
                                    f"{shown}.", plain or f"{param} must be {allowed}, got {shown}")


def over_limit(param: str, asked: str, limit: int, unit: str, flag: str,
               fix: str) -> InvalidParamError:
    """A request that asks for more work than the server allows: the limit and its flag."""
    return InvalidParamError(param, f"Invalid value for '{{param}}': {asked} is more than this "
                                    f"server's limit of {limit} {unit} ({flag}). {fix}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class PromptTooLongError(ValueError):
    """A request whose prompt plus max_tokens does not fit in max_model_len."""

    def __init__(self, prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(self.message_for("max_tokens"))

    def message_for(self, max_tokens_name: str) -> str:
        """The message, naming max_tokens as the client did (`max_completion_tokens`)."""
        prompt_len, max_tokens, max_model_len = self.prompt_len, self.max_tokens, \
            self.max_model_len
        name = max_tokens_name
        if max_tokens is None or prompt_len >= max_model_len:
            return (
                f"This model's maximum context length is {max_model_len} tokens, and your prompt "
                f"has {prompt_len} tokens, which leaves no room for output. Shorten the prompt to "
                f"at most {max_model_len - 1} tokens."
            )
        if max_tokens >= max_model_len:
            # No prompt could fit: "only -904 tokens are available" would be no help.
            return (
                f"Your {name}={max_tokens} request alone fills max_model_len={max_model_len} "
                f"(prompt plus output), leaving no room for your prompt of {prompt_len} tokens. "
                f"Lower {name} to {max_model_len - prompt_len} or less."
            )
        available = max_model_len - max_tokens
        return (
            f"Given your {name}={max_tokens} request and max_model_len={max_model_len}, "
            f"only {available} tokens are available for the prompt, and your prompt has "
            f"{prompt_len} tokens. Shorten the prompt by {prompt_len - available} tokens or "
            f"lower {name} to {max_model_len - prompt_len}."
        )


class EmptyPromptError(ValueError):
    """A request without a single prompt token."""

    def __init__(self) -> None:
        super().__init__("The prompt is empty: give at least one token.")


class InvalidTokenIdError(ValueError):
    """Prompt token ids outside the model's vocabulary."""

    def __init__(self, bad: list[int], vocab_size: int) -> None:
        super().__init__(f"Prompt token ids must be in [0, {vocab_size}) for this model's "
                         f"vocabulary; got {bad[:5]}.")
        self.vocab_size = vocab_size


class KVCacheTooSmallError(ValueError):
    """The KV cache cannot hold a single max_model_len sequence.

    report: the engine's MemoryReport (predicted and measured) when it got that far; `brim
    serve` writes it to the pod's termination message for the operator to re-plan with.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, hint: str,
                 report=None) -> None:
        capacity = num_blocks * block_size
        super().__init__(
            f"The KV cache holds {capacity} tokens ({num_blocks} blocks of {block_size}), fewer "
            f"than max_model_len={max_model_len}, so not even one full-length request fits. "
            f"Lower max_model_len to {capacity} or less, or {hint}."
        )
        self.num_blocks = num_blocks
        self.capacity = capacity
        self.max_model_len = max_model_len
        self.report = report


class EngineDeadError(RuntimeError):
    """The engine can run no further step (a tensor-parallel rank is gone): the requests in
    flight fail, and whoever serves the engine should shut it down rather than retry."""


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel worker process ended while the engine ran.

    rank, pid: the worker's; exitcode: multiprocessing's (negative: killed by that signal).
    """

    def __init__(self, rank: int, pid: int | None, exitcode: int | None, during: str) -> None:
        self.rank, self.pid, self.exitcode = rank, pid, exitcode
        if exitcode is not None and exitcode < 0:
            import signal

            how = f"was killed by {signal.Signals(-exitcode).name}"
        else:
            how = f"exited with code {exitcode}"
        super().__init__(
            f"tensor-parallel worker rank {rank} (pid {pid}) {how} during {during}; the "
            "engine cannot continue without it and has stopped its other workers. Check that "
            "rank's log above (out of memory is the usual cause) and start the engine again.")
