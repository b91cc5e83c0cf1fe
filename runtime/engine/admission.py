"""Whether a request may enter the engine: one set of rules.

The engine applies them in `add_request`; the server applies the same rules before it
queues a request (`admit_all`, through AsyncEngine.check), so that a bad one is refused at
once with the parameter named. Everything a step later reads from a request is checked
here — types and ranges (SamplingParams.validate), token ids against the vocabulary, and
the work one request may ask for (RequestLimits) — so that no request can make a step
fail for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brim.runtime.engine.errors import (
    EmptyPromptError,
    InvalidTokenIdError,
    PromptTooLongError,
    out_of_range,
    over_limit,
)
from brim.runtime.sampling_params import SamplingParams

# Defaults of the server flags of the same names (`brim serve --help`).
DEFAULT_MAX_N = 128  # OpenAI's own bound on n
DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs and OpenAI's top_logprobs bound
DEFAULT_MAX_STOP_STRINGS = 16
DEFAULT_MAX_STOP_STRING_LEN = 256  # characters
DEFAULT_MAX_STOP_TOKEN_IDS = 64
# Unset --max-request-generation-tokens: this many full-length completions' worth.
GENERATION_TOKENS_PER_MAX_MODEL_LEN = 16


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """How much work one request may ask for (each a `brim serve` flag of the same name).

    max_n: completions one request may ask for: n, times the number of prompts of a
        batched completions request.
    max_request_generation_tokens: tokens one request may ask to generate in all:
        n x max_tokens summed over its prompts, max_tokens being what the context leaves
        when unset. None: GENERATION_TOKENS_PER_MAX_MODEL_LEN x max_model_len.
    max_logprobs: alternatives per token (`logprobs`, chat's `top_logprobs`).
    max_stop_strings / max_stop_string_len: entries of `stop`, and characters in each
        (the stream holds back the longest one's length).
    max_stop_token_ids: entries of `stop_token_ids`.
    """

    max_n: int = DEFAULT_MAX_N
    max_request_generation_tokens: int | None = None
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_stop_string_len: int = DEFAULT_MAX_STOP_STRING_LEN
    max_stop_token_ids: int = DEFAULT_MAX_STOP_TOKEN_IDS

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None and name == "max_request_generation_tokens":
                continue
            least = 1 if name in ("max_n", "max_request_generation_tokens") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What every request is checked against.

    max_model_len: prompt + generated tokens per request.
    vocab_size: token ids must be in [0, vocab_size).
    request: how much work one request may ask for (server flags).
    """

    max_model_len: int
    vocab_size: int
    request: RequestLimits = field(default_factory=RequestLimits)

    @property
    def max_request_generation_tokens(self) -> int:
        limit = self.request.max_request_generation_tokens
        return limit if limit is not None else \
            GENERATION_TOKENS_PER_MAX_MODEL_LEN * self.max_model_len


def admit(prompt_token_ids: list[int], params: SamplingParams, limits: Limits) -> int:
    """The request's max_tokens (when params.max_tokens is None: what the context leaves),
    or raise.

    Raises EmptyPromptError, InvalidTokenIdError, PromptTooLongError or InvalidParamError
    (all ValueErrors); InvalidParamError.param names the SamplingParams field.
    """
    params.validate()
    _check_prompt(prompt_token_ids, limits.vocab_size)
    _check_params(params, limits)
    prompt_len = len(prompt_token_ids)
    max_model_len = limits.max_model_len
    if prompt_len >= max_model_len:
        raise PromptTooLongError(prompt_len, None, max_model_len)
    if params.max_tokens is None:
        max_tokens = max_model_len - prompt_len
    elif prompt_len + params.max_tokens > max_model_len:
        raise PromptTooLongError(prompt_len, params.max_tokens, max_model_len)
    else:
        max_tokens = params.max_tokens
    if params.min_tokens > max_tokens:
        raise out_of_range("min_tokens", f"<= the {max_tokens} tokens this request can "
                                         f"generate (max_tokens, or what max_model_len="
                                         f"{max_model_len} leaves after the prompt)",
                           params.min_tokens)
    _check_work([max_tokens], params, limits)
    return max_tokens


def admit_all(prompts: list[list[int]], params: SamplingParams, limits: Limits) -> list[int]:
    """`admit` for each prompt of one API request, then the request's total work.

    Returns each prompt's max_tokens. The totals are what one client asks for at once:
    n x the number of prompts completions, n x max_tokens generated tokens per prompt.
    """
    if not prompts:
        raise EmptyPromptError()
    max_tokens = [admit(prompt, params, limits) for prompt in prompts]
    _check_work(max_tokens, params, limits)
    return max_tokens


def _check_prompt(prompt_token_ids: list[int], vocab_size: int) -> None:
    if len(prompt_token_ids) == 0:
        raise EmptyPromptError()
    bad = [t for t in prompt_token_ids
           if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidTokenIdError(bad, vocab_size)


def _check_params(params: SamplingParams, limits: Limits) -> None:
    """The model- and server-dependent bounds of the sampling parameters."""
    request, vocab_size = limits.request, limits.vocab_size
    if params.n > request.max_n:
        raise over_limit("n", f"n={params.n}", request.max_n, "completions per request",
                         "--max-n", "Ask for fewer completions, or start the server with a "
                                    "higher --max-n.")
    if params.logprobs is not None:
        max_logprobs = min(request.max_logprobs, vocab_size)
        if params.logprobs > max_logprobs:
            raise over_limit("logprobs", f"{{param}}={params.logprobs}", max_logprobs,
                             "alternatives per token", "--max-logprobs",
                             f"Ask for at most {max_logprobs}.")
    if len(params.stop) > request.max_stop_strings:
        raise over_limit("stop", f"{len(params.stop)} stop strings", request.max_stop_strings,
                         "stop strings", "--max-stop-strings", "Send fewer stop strings.")
    longest = max(params.stop, key=len, default="")
    if len(longest) > request.max_stop_string_len:
        raise over_limit("stop", f"a stop string of {len(longest)} characters",
                         request.max_stop_string_len, "characters per stop string",
                         "--max-stop-string-len", "Send shorter stop strings.")
    if len(params.stop_token_ids) > request.max_stop_token_ids:
        raise over_limit("stop_token_ids", f"{len(params.stop_token_ids)} stop token ids",
                         request.max_stop_token_ids, "stop token ids",
                         "--max-stop-token-ids", "Send fewer stop token ids.")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise out_of_range("stop_token_ids", f"token ids in [0, {vocab_size}) (this model's "
                                             "vocabulary)", bad[:5])


def _check_work(max_tokens: list[int], params: SamplingParams, limits: Limits) -> None:
    """n x the number of prompts completions, and n x max_tokens generated tokens in all."""
    request = limits.request
    num_prompts = len(max_tokens)
    num_completions = params.n * num_prompts
    if num_prompts > 1 and num_completions > request.max_n:
        param = "n" if params.n > 1 else "prompt"
        raise over_limit(param, f"n={params.n} x {num_prompts} prompts = {num_completions} "
                                "completions", request.max_n, "completions per request",
                         "--max-n", "Send fewer prompts per request, or lower n.")
    total = params.n * sum(max_tokens)
    limit = limits.max_request_generation_tokens
    if total > limit:
        asked = (f"{{param}} unset (what the context leaves, up to {max(max_tokens)})"
                 if params.max_tokens is None else f"{{param}}={params.max_tokens}")
        prompts = f" x {num_prompts} prompts" if num_prompts > 1 else ""
        raise over_limit("max_tokens", f"n={params.n}{prompts} x {asked} = {total} tokens",
                         limit, "generated tokens per request",
                         "--max-request-generation-tokens", "Lower {param} or n.")
