"""What the engine hands back: cumulative outputs per request, like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str = ""


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n completions, cumulative so far.

    finish_reason: "stop" (EOS, stop string or stop token), "length" (max_tokens or
        max_model_len), "abort", or None while running.
    stop_reason: the stop string or stop token id that ended it, if any.
    logprobs: one dict per generated token, token_id -> Logprob (the chosen token plus the
        top-k alternatives), when requested.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
