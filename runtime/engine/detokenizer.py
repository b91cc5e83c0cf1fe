"""Incremental detokenization and stop strings."""

from __future__ import annotations

import weakref

# Prompt tokens decoded with the first output tokens, so that tokenizers which mark word
# boundaries on the following token (SentencePiece's "▁") produce the right first space.
_CONTEXT_TOKENS = 6


def backend_decoder(tokenizer):
    """The `tokenizers.Tokenizer` under a fast transformers tokenizer when its `decode` is
    that Rust decode and nothing more, else None.

    Two decodes per token per request make transformers' wrapper (argument conversion,
    batching checks: about 60% of each call) a visible share of a large batch's step. It
    is skipped only when it would add nothing: `decode` and `_decode` not overridden by the
    tokenizer's class, and no clean-up of tokenization spaces.
    """
    try:
        return _BACKENDS[tokenizer]
    except (KeyError, TypeError):
        pass
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    cls, inner = type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    backend = None
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and isinstance(inner, Tokenizer)
            and cls.decode is PreTrainedTokenizerFast.decode
            and cls._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        backend = inner
    try:
        _BACKENDS[tokenizer] = backend
    except TypeError:  # not weakly referenceable: decided again next time
        pass
    return backend


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas in O(tokens) overall.

    It decodes a short window twice, with and without the newest tokens, and emits the
    difference; a window ending in an incomplete UTF-8 sequence ("\ufffd") waits for more.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = backend_decoder(tokenizer)
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        # Only a prompt given as token ids can leave the read window inside a UTF-8
        # character (later windows end on complete text). Those bytes are not text yet: the
        # character they start belongs to this delta, and the next window must not start
        # inside it. (The cost: a prompt ending in a literal U+FFFD repeats it once.)
        is_cut = prefix.endswith("\ufffd")
        prefix = prefix.rstrip("\ufffd")
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            if not is_cut:
                self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix) :]
        return ""


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends within the last num_new_chars characters.

    Returns (index where it starts, the stop string) or None. Only the tail is searched:
    earlier text was checked when it arrived.
    """
    best = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
