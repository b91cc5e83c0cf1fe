"""Per-request sampling parameters, shaped like vLLM's `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_p / top_k / min_p: restrict the support (top_k 0 or -1 disables it).
    seed: a per-request generator, so the same seed gives the same tokens whatever
        else shares the batch.
    max_tokens / min_tokens: bounds on generated tokens; below min_tokens, EOS and
        stop_token_ids are masked and stop strings are not honoured.
    stop: strings that end generation; they are not part of the returned text.
    stop_token_ids: token ids that end generation (kept in token_ids, not in text).
    ignore_eos: keep generating past the model's EOS token.
    n: independent completions per prompt.
    logprobs: number of top alternatives to return per token (0 = only the chosen).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Tokens whose logits are masked (set by the engine: EOS during min_tokens).
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check("temperature", self.temperature >= 0, ">= 0")
        self._check("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        self._check("top_k", self.top_k >= 0, "0 or -1 (disabled), or a positive integer")
        self._check("min_p", 0 <= self.min_p <= 1, "in [0, 1]")
        self._check("n", self.n >= 1, ">= 1")
        self._check("min_tokens", self.min_tokens >= 0, ">= 0")
        if self.max_tokens is not None:
            self._check("max_tokens", self.max_tokens >= 1, ">= 1")
            if self.min_tokens > self.max_tokens:
                raise ValueError(
                    f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
                )
        if self.logprobs is not None:
            self._check("logprobs", self.logprobs >= 0, ">= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.temperature < _GREEDY_EPS:
            self.temperature = 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _check(self, name: str, ok: bool, limit: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise ValueError(f"{name} must be {limit}, got {value!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        values = {f: getattr(self, f) for f in self.__dataclass_fields__ if not f.startswith("_")}
        values.update(changes)
        return SamplingParams(**values)
