"""Whether a request may enter the engine: one set of rules.

The engine applies them in `add_request`; the server applies the same function before it
queues a request, so that a bad one is refused at once with the parameter named.
"""

from __future__ import annotations

from dataclasses import dataclass

from brim.runtime.engine.errors import EmptyPromptError, InvalidTokenIdError, PromptTooLongError
from brim.runtime.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Limits:
    """What every request is checked against.

    max_model_len: prompt + generated tokens per request.
    vocab_size: token ids must be in [0, vocab_size).
    """

    max_model_len: int
    vocab_size: int


def admit(prompt_token_ids: list[int], params: SamplingParams, limits: Limits) -> int:
    """The request's max_tokens (None means what the context leaves), or raise.

    Raises EmptyPromptError, InvalidTokenIdError or PromptTooLongError (all ValueErrors).
    """
    prompt_len = len(prompt_token_ids)
    if prompt_len == 0:
        raise EmptyPromptError()
    bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidTokenIdError(bad, limits.vocab_size)
    max_model_len = limits.max_model_len
    if prompt_len >= max_model_len:
        raise PromptTooLongError(prompt_len, None, max_model_len)
    if params.max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + params.max_tokens > max_model_len:
        raise PromptTooLongError(prompt_len, params.max_tokens, max_model_len)
    return params.max_tokens
