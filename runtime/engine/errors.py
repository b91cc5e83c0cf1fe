"""Errors a caller can act on; each message says what was asked, the limit and what to do."""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """A request whose prompt plus max_tokens does not fit in max_model_len."""

    def __init__(self, prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        if max_tokens is None or prompt_len >= max_model_len:
            message = (
                f"This model's maximum context length is {max_model_len} tokens, and your prompt "
                f"has {prompt_len} tokens, which leaves no room for output. Shorten the prompt to "
                f"at most {max_model_len - 1} tokens."
            )
        elif max_tokens >= max_model_len:
            # No prompt could fit: "only -904 tokens are available" would be no help.
            message = (
                f"Your max_tokens={max_tokens} request alone fills max_model_len={max_model_len} "
                f"(prompt plus output), leaving no room for your prompt of {prompt_len} tokens. "
                f"Lower max_tokens to {max_model_len - prompt_len} or less."
            )
        else:
            available = max_model_len - max_tokens
            message = (
                f"Given your max_tokens={max_tokens} request and max_model_len={max_model_len}, "
                f"only {available} tokens are available for the prompt, and your prompt has "
                f"{prompt_len} tokens. Shorten the prompt by {prompt_len - available} tokens or "
                f"lower max_tokens to {max_model_len - prompt_len}."
            )
        super().__init__(message)


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
