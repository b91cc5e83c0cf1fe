"""Incremental detokenization and stop strings."""

from __future__ import annotations

# Prompt tokens decoded with the first output tokens, so that tokenizers which mark word
# boundaries on the following token (SentencePiece's "▁") produce the right first space.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas in O(tokens) overall.

    It decodes a short window twice, with and without the newest tokens, and emits the
    difference; a window ending in an incomplete UTF-8 sequence ("\ufffd") waits for more.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
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
