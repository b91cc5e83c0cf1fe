"""Per-request sampling parameters, shaped like vLLM's `SamplingParams`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from brim.runtime.engine.errors import InvalidParamError, out_of_range

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5
# A seed becomes a torch.Generator seed: a signed 64-bit integer (vLLM's range too).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
OUTPUT_KINDS = ("cumulative", "final_only")


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_p / top_k / min_p: restrict the support (top_k 0 or -1 disables it; a top_k
        above the vocabulary keeps it all).
    seed: a per-request generator, so the same seed gives the same tokens whatever
        else shares the batch; a signed 64-bit integer.
    max_tokens / min_tokens: bounds on generated tokens; below min_tokens, EOS and
        stop_token_ids are masked and stop strings are not honoured.
    stop: strings that end generation; they are not part of the returned text.
    stop_token_ids: token ids that end generation (kept in token_ids, not in text).
    ignore_eos: keep generating past the model's EOS token.
    n: independent completions per prompt.
    logprobs: number of top alternatives to return per token (0 = only the chosen).
    output_kind: "cumulative" (the default: after every step that gives the request
        tokens, its output so far, for streaming) or "final_only" (its finished output
        only: what `LLM.generate` waits for, saving an output object per request per step).

    Every field is checked on creation and again by the engine's admission
    (`validate()`), so a value that would fail inside an engine step is refused when the
    request is added, naming the field and its allowed range (InvalidParamError).
    Limits that depend on the model or the server (the vocabulary, max_model_len, --max-n)
    are admission's (`engine/admission.py`).
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
    output_kind: str = "cumulative"
    # Tokens whose logits are masked (set by the engine: EOS during min_tokens).
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, (list, tuple)) or self.stop is None:
            self.stop = list(self.stop or [])
        if isinstance(self.stop_token_ids, (list, tuple)) or self.stop_token_ids is None:
            self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1 and _is_int(self.top_k):
            self.top_k = 0
        self.validate()
        if self.temperature < _GREEDY_EPS:
            self.temperature = 0.0
        self._all_stop_token_ids = set(self.stop_token_ids)

    def validate(self) -> None:
        """Raise InvalidParamError for the first field of the wrong type or out of range."""
        _number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _integer("top_k", self.top_k, "0 or -1 (disabled), or a positive integer",
                 lambda v: v >= -1)
        _number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _integer("n", self.n, ">= 1", lambda v: v >= 1)
        _integer("min_tokens", self.min_tokens, ">= 0", lambda v: v >= 0)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
            if self.min_tokens > self.max_tokens:
                raise out_of_range("min_tokens", f"<= max_tokens ({self.max_tokens})",
                                   self.min_tokens, f"min_tokens ({self.min_tokens}) must be "
                                                    f"<= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _integer("seed", self.seed, f"in [{SEED_MIN}, {SEED_MAX}]",
                     lambda v: SEED_MIN <= v <= SEED_MAX)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, ">= 0", lambda v: v >= 0)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise out_of_range("stop", "a string or a list of strings", self.stop)
        if any(not s for s in self.stop):
            raise InvalidParamError("stop", "Invalid value for '{param}': stop strings must be "
                                            "non-empty.", "stop strings must be non-empty")
        if not isinstance(self.stop_token_ids, list) or not all(
                _is_int(t) for t in self.stop_token_ids):
            raise out_of_range("stop_token_ids", "a list of token ids", self.stop_token_ids)
        if self.output_kind not in OUTPUT_KINDS:
            raise out_of_range("output_kind", " or ".join(map(repr, OUTPUT_KINDS)),
                               self.output_kind)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise out_of_range(name, "true or false", getattr(self, name))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        values = {f: getattr(self, f) for f in self.__dataclass_fields__ if not f.startswith("_")}
        values.update(changes)
        return SamplingParams(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(name: str, value, allowed: str, ok) -> None:
    if not _is_int(value):
        raise out_of_range(name, f"an integer {allowed}" if allowed[0] in "<>i" else
                           f"an integer: {allowed}", value)
    if not ok(value):
        raise out_of_range(name, allowed, value)


def _number(name: str, value, allowed: str, ok) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise out_of_range(name, allowed, value)
