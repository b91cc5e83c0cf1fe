"""Speculative decoding: guess the next k tokens cheaply, let the target check them in one step.

A decoding request whose proposer guessed k tokens is scheduled for 1 + k new tokens in the
same step as everyone else (the scheduler's one rule, with the guesses appended after its
last token). The target's logits at those 1 + k positions decide: greedy keeps the longest
run of guesses equal to its own argmax, plus its own next token; sampling accepts guess i
with probability p_i(guess) / q_i(guess) and, at the first rejection, draws from the
normalised residual max(p_i - q_i, 0) — so every emitted token is distributed exactly as
the target alone would have drawn it (Leviathan et al., 2023; Chen et al., 2023). The KV
written for rejected guesses lies beyond the request's num_computed_tokens: blocks past it go
back to the pool (never cached: only blocks of real tokens are), and the next step overwrites
the rest.

Proposers:
- n-gram prompt lookup ("ngram"): the last n tokens (n from prompt_lookup_max down to
  prompt_lookup_min) are looked up in the request's own prompt and output; what followed
  their latest earlier occurrence is the guess. No model, so q is one-hot on the guess.
- a draft model ("draft_model", engine/draft.py): a smaller model with the target's
  vocabulary guesses k tokens one at a time (greedy for greedy requests, sampled from its own
  distribution q otherwise). It keeps its own KV cache in the target's blocks: the same
  block tables, its own tensors, written by the same steps (so prefix caching, preemption and
  chunked prefill need nothing of their own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16
MAX_PROMPT_LOOKUP = 32
METHODS = ("ngram", "draft_model")
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
         "draft_tensor_parallel_size")
_NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")
_UNSUPPORTED = ("eagle", "eagle3", "medusa", "mtp", "mlp_speculator", "suffix")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """method: "ngram" or "draft_model". num_speculative_tokens: guesses per step (k).
    prompt_lookup_max / _min: the longest and shortest suffix the n-gram proposer matches.
    model: the draft model (a checkpoint folder or Hub id; resolved to a folder by
    EngineConfig.create) for "draft_model"."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported; brim "
                             f"supports {', '.join(METHODS)}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError('a draft model is named by "model" with method "draft_model" '
                             '(and only then), e.g. {"model": "/models/draft", '
                             '"num_speculative_tokens": 4}')
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in 1.."
                             f"{MAX_SPECULATIVE_TOKENS}, got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    1 <= value <= MAX_PROMPT_LOOKUP):
                raise ValueError(f"{name} must be an integer in 1..{MAX_PROMPT_LOOKUP}, "
                                 f"got {value!r}")
        if lo > hi:
            raise ValueError(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """From vLLM's speculative_config: a dict or its JSON text; None or {} is off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON ({exc.msg}); give an "
                                 'object such as {"method": "ngram", '
                                 '"num_speculative_tokens": 3}') from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be an object, got {type(value).__name__}")
        if not value:
            return None
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; brim knows "
                             f"{', '.join(_KEYS)}")
        method = value.get("method")
        if method in _UNSUPPORTED:
            raise ValueError(f"speculative method {method!r} is not supported by brim; use "
                             '{"method": "ngram", ...} (prompt lookup) or {"model": '
                             '"<draft checkpoint>", ...} (a draft model)')
        model = value.get("model")
        if method is None:  # vLLM's rule: a named model means a draft model
            method = "draft_model" if model is not None else "ngram"
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError('method "draft_model" needs "model": the draft checkpoint '
                                 "(a folder or Hugging Face repository id) with the target's "
                                 "vocabulary")
            given = sorted(set(value) & set(_NGRAM_KEYS))
            if given:
                raise ValueError(f"{', '.join(given)} apply to method ngram only; drop them "
                                 "for a draft model")
            draft_tp = value.get("draft_tensor_parallel_size", 1)
            if draft_tp != 1:
                raise ValueError(f"draft_tensor_parallel_size must be 1 (the draft runs on "
                                 f"one device), got {draft_tp!r}")
        elif model is not None:
            raise ValueError(f'"model" names a draft model, which method {method!r} does not '
                             'use; drop it, or use method "draft_model"')
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens (the guesses "
                             f"per step, 1..{MAX_SPECULATIVE_TOKENS})")
        k = value["num_speculative_tokens"]
        if method == "draft_model":
            return cls(method=method, num_speculative_tokens=k, model=model)
        hi = value.get("prompt_lookup_max")
        lo = value.get("prompt_lookup_min")
        if lo is None:
            lo = 1
        if hi is None:
            hi = max(3, lo) if isinstance(lo, int) else 3
        return cls(method=method, num_speculative_tokens=k, prompt_lookup_max=hi,
                   prompt_lookup_min=lo)

    def to_dict(self) -> dict:
        if self.method == "draft_model":
            return {"method": self.method, "model": self.model,
                    "num_speculative_tokens": self.num_speculative_tokens}
        return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max,
                "prompt_lookup_min": self.prompt_lookup_min}


class NgramProposer:
    """Prompt lookup over a request's own tokens.

    The tokens are kept as 4-byte little-endian words in a bytearray on the request
    (`spec_state`), extended as tokens arrive, so a lookup is bytes.rfind in C rather than
    a Python scan: a few microseconds for a few thousand tokens.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.lo, self.hi = config.prompt_lookup_min, config.prompt_lookup_max

    def propose_all(self, batch) -> None:
        """Set spec_token_ids for each (request, limit) pair."""
        for request, limit in batch:
            request.spec_token_ids = self.propose(request, limit)

    def propose(self, request, limit: int) -> list[int]:
        """Up to min(k, limit) guessed tokens to follow request.all_token_ids."""
        k = min(self.k, limit)
        if k <= 0:
            return []
        tokens = request.all_token_ids
        words = request.spec_state
        if words is None or len(words) > 4 * len(tokens):
            words = request.spec_state = bytearray()
        if len(words) < 4 * len(tokens):
            words += b"".join(t.to_bytes(4, "little", signed=True)
                              for t in tokens[len(words) // 4:])
        n_tokens = len(tokens)
        for n in range(min(self.hi, n_tokens - 1), self.lo - 1, -1):
            suffix = bytes(words[4 * (n_tokens - n):])
            # The latest occurrence that ends before the last token (not the suffix itself).
            end = 4 * (n_tokens - 1)
            while True:
                at = words.rfind(suffix, 0, end)
                if at < 0:
                    break
                if at % 4 == 0:
                    start = at // 4 + n
                    return list(tokens[start:start + k])
                end = at + len(suffix) - 1  # misaligned: look further left
        return []


class AcceptanceBackOff:
    """Stops guessing, for a while, for a request whose guesses keep failing.

    A guess costs a row through the model whether it is accepted or not, so a request whose
    output is not in its prompt (n-gram) or that the draft model reads badly runs slower
    with speculation than without. Each request keeps decayed counts of its checked and
    accepted guesses (the last few checks weigh most); when at least MIN_CHECKED guesses
    weigh in and under MIN_RATE of them were accepted, the request decodes plainly for
    `pause` steps (2, 4, 8 ... MAX_PAUSE, doubling while it stays bad), then tries again
    with fresh counts. A good look resets the pause.
    """

    DECAY = 0.7
    MIN_CHECKED = 8
    MIN_RATE = 0.25
    MAX_PAUSE = 32

    __slots__ = ("checked", "accepted", "pause", "skip")

    def __init__(self) -> None:
        self.checked = self.accepted = 0.0
        self.pause = 0  # the length of the last pause, in steps
        self.skip = 0  # steps left in the current one

    def wants_guesses(self) -> bool:
        """Whether to guess for the request's next step (called once per decode step)."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def record(self, checked: int, accepted: int) -> None:
        self.checked = self.checked * self.DECAY + checked
        self.accepted = self.accepted * self.DECAY + accepted
        if self.checked < self.MIN_CHECKED:
            return
        if self.accepted < self.MIN_RATE * self.checked:
            self.pause = min(max(2 * self.pause, 2), self.MAX_PAUSE)
            self.skip = self.pause
            self.checked = self.accepted = 0.0
        else:
            self.pause = 0
